r"""tfhfp8's fused accumulators against MMA-Sim (microsoft/MMA-Sim, MIT), bit for bit.

MMA-Sim needs PyTorch, which the project does not depend on: the check runs in two
environments, the project's and a scratch one with PyTorch and MMA-Sim's sources.

    .venv/bin/python -m models.tensor_cores.mmasim_check write /tmp/fused_cases.npz
    PYTHONPATH=/path/to/MMA-Sim /tmp/torch-venv/bin/python \
        models/tensor_cores/mmasim_check.py check /tmp/fused_cases.npz
    PYTHONPATH=/path/to/MMA-Sim /tmp/torch-venv/bin/python \
        models/tensor_cores/mmasim_check.py instructions /tmp/fused_cases.npz

`write` draws, for every named accumulator of `tfhfp8.fused_accumulation.HARDWARE`,
dot products of random values of the instruction's input types (zeros and subnormals
included, random signs; K from 1 to 300, not multiples of the group; for TF32
instructions, FP32 values with all 23 mantissa bits, which both sides truncate) and
adversarial ones (cancellation, values spanning the whole format), and stores them with
tfhfp8's results. `check` recomputes each with MMA-Sim's `nv_fused_dot_add` (for
kind::mxf4nvf4, `nv_fused_dot_add_with_block_scale`; one call per group
of the instruction, chained through the accumulator, as its `mma` / `wgmma` /
`tcgen05mma` models chain them; DeepSeek's promotion as an FP32 add every 128
products) and counts the results that differ in any bit. `instructions` recomputes the
same dot products with MMA-Sim's models of the instructions themselves (`mma`, `wgmma`,
`tcgen05mma`, chained through their accumulator), so that the group sizes and fraction
bits of `HARDWARE` are checked too, not only the arithmetic of one group.
"""

import sys

import numpy as np

KS = (1, 7, 32, 33, 100, 257, 300)
ROWS = 24


def _float32_values(rng):
    """Positive FP32 values: every exponent (subnormals included), random mantissas;
    with 2^-149, 2^-148 and FP32's largest value at indices 1, 2 and -1."""
    bits = rng.integers(1, 0x7F800000, size=4096).astype(np.uint32)
    values = np.sort(bits.view(np.float32))
    return np.r_[0.0, 2.0 ** -149, 2.0 ** -148, values, np.finfo(np.float32).max]


# The operand types checked per accumulator (default: its first and last input types).
# MMA-Sim's kind::mxf8f6f4 takes E4M3 and E5M2 elements (its FP6 and FP4 are to do);
# its kind::mxf4nvf4, E2M1 (packed two to a byte).
CHECKED_TYPES = {"nvidia_blackwell_mxfp8": ("mxfp8_e4m3", "mxfp8_e5m2"),
                 "nvidia_blackwell_mxfp4": ("mxfp4_e2m1", "mxfp4_e2m1")}


def _block_scales(elements, fmt, rng, scales):
    """MX block-scale exponents (one per 32 elements along the last axis) drawn from
    `scales`, after putting a value of the element type's top binade into every block
    that has none (so that the scale is the one its quantizer chooses)."""
    top = fmt.element.values()
    top = top[top >= 2.0 ** fmt.emax_element]
    rows = elements.reshape(-1, elements.shape[-1])
    for row in rows:
        for start in range(0, len(row), 32):
            block = row[start:start + 32]
            if np.abs(block).max() < top[0]:
                block[rng.integers(len(block))] = rng.choice(top) * rng.choice([-1, 1])
    blocks = -(-elements.shape[-1] // 32)
    return rng.choice(scales, elements.shape[:-1] + (blocks,))


def _cases(acc, rng):
    """(a_type, b_type, a [R, K], b [K], a_scales [R, K/32], b_scales [K/32]) per K for
    accumulator `acc`: operand elements, and for MX operands their block scales' exponents
    (else None)."""
    import tfhfp8  # noqa: PLC0415

    a_type, b_type = CHECKED_TYPES.get(acc.name, (acc.input_types[0], acc.input_types[-1]))
    fmt_a, fmt_b = tfhfp8.formats.get(a_type), tfhfp8.formats.get(b_type)
    blocked = isinstance(fmt_a, tfhfp8.BlockScaled)
    if acc.truncates_inputs:
        values_a = values_b = _float32_values(rng)
    else:
        values_a = (fmt_a.element if blocked else fmt_a).values()
        values_b = (fmt_b.element if blocked else fmt_b).values()
    for k in KS:
        a = rng.choice(values_a, (ROWS, k)) * rng.choice([-1.0, 1.0], (ROWS, k))
        b = rng.choice(values_b, k) * rng.choice([-1.0, 1.0], k)
        a[0] = np.resize([values_a[-1], -values_a[-1], values_a[1], values_a[2]], k)
        a[1] = np.where(rng.random(k) < 0.5, values_a[-1], values_a[1])
        a_scales = b_scales = None
        if blocked:  # rows 2 and 3: E8M0's least scale, and its whole range
            a_scales = _block_scales(a, fmt_a, rng, np.arange(-40, 41))
            a_scales[2] = -127
            a_scales[3] = rng.integers(-127, 101, a_scales.shape[1])
            b_scales = _block_scales(b, fmt_b, rng, np.arange(-40, 41))
        yield a_type, b_type, a.astype(np.float32), b.astype(np.float32), a_scales, b_scales


def _scaled(elements, scales):
    """The values of MX elements with their block scales' exponents."""
    if scales is None:
        return elements
    return (elements * 2.0 ** np.repeat(scales, 32, axis=-1)[..., :elements.shape[-1]]
            ).astype(np.float32)


def write(path):
    import tfhfp8  # noqa: PLC0415
    from tfhfp8.fused_accumulation import HARDWARE  # noqa: PLC0415

    rng = np.random.default_rng(0)
    arrays, index = {}, []
    for name, acc in HARDWARE.items():
        for a_type, b_type, a, b, a_scales, b_scales in _cases(acc, rng):
            # TF32 instructions take the FP32 values as they are (and truncate them).
            operand_formats = ({} if acc.truncates_inputs
                               else {"a_format": a_type, "b_format": b_type})
            got = tfhfp8.matmul(_scaled(a, a_scales), _scaled(b, b_scales)[:, None], acc,
                                **operand_formats)
            key = f"{name}/{a.shape[1]}"
            arrays[key + "/a"], arrays[key + "/b"] = a, b
            if a_scales is not None:
                arrays[key + "/a_scales"], arrays[key + "/b_scales"] = a_scales, b_scales
            arrays[key + "/got"] = got.numpy()[:, 0]
            index.append((key, name, a_type, b_type, acc.group_size, acc.fraction_bits,
                          acc.output, acc.chunk_size or 0))
    np.savez(path, index=np.array(index, dtype=object), **arrays)
    print(f"{len(index)} cases, {sum(a.shape[0] for k, a in arrays.items() if k.endswith('/a'))}"
          f" dot products -> {path}")


# The side below runs with PyTorch and MMA-Sim, without tfhfp8.
TORCH_TYPES = {"float16": "float16", "bfloat16": "bfloat16", "tensorfloat32": "float32",
               "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
               "mxfp8_e4m3": "float8_e4m3fn", "mxfp8_e5m2": "float8_e5m2",
               "mxfp4_e2m1": "float32"}  # FP4 values unpacked, as MMA-Sim unpacks them
OUTPUTS = {"float32": "f32", "e8m13": "f32_e8m13", "float16": "f16"}


def _operands(data, key, a_type, b_type):
    """(a, b, a_scales, b_scales) of a case as torch tensors in the instruction's types:
    elements, and E8M0 block scales (None unless MX)."""
    import torch  # noqa: PLC0415

    a = torch.tensor(data[key + "/a"]).to(getattr(torch, TORCH_TYPES[a_type]))
    b = torch.tensor(data[key + "/b"]).to(getattr(torch, TORCH_TYPES[b_type]))
    if key + "/a_scales" not in data:
        return a, b, None, None
    a_scales, b_scales = (torch.tensor(2.0 ** data[key + name].astype(np.float64)).to(
        torch.float8_e8m0fnu) for name in ("/a_scales", "/b_scales"))
    return a, b, a_scales, b_scales


def _compare(key, name, expected, got, total, differ):
    """Counts (per accumulator) the results that differ in any bit, printing each."""
    got = got.astype(np.float32)
    same = (expected.view(np.uint32) == got.view(np.uint32)) | (
        np.isnan(expected) & np.isnan(got))
    total[name] = total.get(name, 0) + len(got)
    differ[name] = differ.get(name, 0) + int((~same).sum())
    for row in np.flatnonzero(~same):
        print(f"DIFFER {key} row {row}: MMA-Sim {expected[row]!r}, tfhfp8 {got[row]!r}")


def _group_scales(scales, start, group, fill):
    """The E8M0 scales of one group's blocks of 32 (`fill` past the end)."""
    import torch  # noqa: PLC0415

    blocks = max(1, group // 32)
    out = torch.full((blocks,), fill).to(scales.dtype)
    given = scales[start // 32:start // 32 + blocks]
    out[:len(given)] = given
    return out


def _group_products(a, b, a_scales, b_scales, group, bits, output, chunk):
    """a [R, K] @ b [K] by MMA-Sim's `nv_fused_dot_add`, one group at a time (for
    kind::mxf4nvf4, its `nv_fused_dot_add_with_block_scale`)."""
    import torch  # noqa: PLC0415
    from mmasim.simulator.arithmetic import (nv_fused_dot_add,  # noqa: PLC0415
                                             nv_fused_dot_add_with_block_scale,
                                             truncate_to_tf32)

    if a.dtype == torch.float32:  # tf32: as MMA-Sim's mma, wgmma and tcgen05mma do
        a, b = truncate_to_tf32(a), truncate_to_tf32(b)
    rows, k = a.shape
    out = np.empty(rows, np.float32)
    for row in range(rows):
        c = total = torch.tensor(0.0, dtype=torch.float32)
        for start in range(0, k, group):
            x = torch.zeros(group, dtype=a.dtype)
            y = torch.zeros(group, dtype=b.dtype)
            x[:min(group, k - start)] = a[row, start:start + group]
            y[:min(group, k - start)] = b[start:start + group]
            if group == 64:  # kind::mxf4nvf4: two blocks of 32 (padding: 2^-127)
                c = nv_fused_dot_add_with_block_scale(
                    x, y, c, _group_scales(a_scales[row], start, group, 2.0 ** -127),
                    _group_scales(b_scales, start, group, 2.0 ** -127), bits).float()
            else:
                scales = {} if a_scales is None else {
                    "scale_a": a_scales[row, start // group],
                    "scale_b": b_scales[start // group]}
                c = nv_fused_dot_add(x, y, c, bits, OUTPUTS[output], **scales).float()
            if chunk and ((start + group) % chunk == 0 or start + group >= k):
                total, c = total + c, torch.tensor(0.0, dtype=torch.float32)
        out[row] = (total if chunk else c).item()
    return out


def check(path):
    data = np.load(path, allow_pickle=True)
    total, differ = {}, {}
    for key, name, a_type, b_type, group, bits, output, chunk in data["index"]:
        expected = _group_products(*_operands(data, key, a_type, b_type), int(group),
                                   int(bits), output, int(chunk))
        _compare(key, name, expected, data[key + "/got"], total, differ)
    for name in total:
        print(f"{name:32s} {total[name]:5d} dot products, {differ[name]} differ")
    print(f"all: {sum(total.values())} dot products, {sum(differ.values())} differ")


# Accumulator -> (MMA-Sim class, architecture, qualifier pattern: {a}, {b} the operand
# types), with the instruction's own K.
INSTRUCTIONS = {
    "nvidia_volta_fp16": ("mma", "Volta", "m8n8k4.f32.{a}.{b}.f32"),
    "nvidia_ampere_fp16": ("mma", "Ampere", "m16n8k16.f32.{a}.{b}.f32"),
    "nvidia_ampere_bf16": ("mma", "Ampere", "m16n8k16.f32.{a}.{b}.f32"),
    "nvidia_ampere_tf32": ("mma", "Ampere", "m16n8k8.f32.{a}.{b}.f32"),
    "nvidia_ada_fp8": ("mma", "Ada Lovelace", "m16n8k32.f32.{a}.{b}.f32"),
    "nvidia_hopper_fp16": ("wgmma", "Hopper", "m64n8k16.f32.{a}.{b}"),
    "nvidia_hopper_bf16": ("wgmma", "Hopper", "m64n8k16.f32.{a}.{b}"),
    "nvidia_hopper_tf32": ("wgmma", "Hopper", "m64n8k8.f32.{a}.{b}"),
    "nvidia_hopper_fp8": ("wgmma", "Hopper", "m64n8k32.f32.{a}.{b}"),
    "nvidia_hopper_fp8_promote128": ("wgmma", "Hopper", "m64n8k32.f32.{a}.{b}"),
    "nvidia_blackwell_fp16": ("tcgen05mma", "Blackwell", "m64n8k16.f32.{a}.{b}"),
    "nvidia_blackwell_bf16": ("tcgen05mma", "Blackwell", "m64n8k16.f32.{a}.{b}"),
    "nvidia_blackwell_tf32": ("tcgen05mma", "Blackwell", "m64n8k8.f32.{a}.{b}"),
    "nvidia_blackwell_fp8": ("tcgen05mma", "Blackwell", "m64n8k32.f32.{a}.{b}"),
    "nvidia_blackwell_mxfp8": ("tcgen05mma_block_scale", "Blackwell",
                               "m128n8k32.block32.f32.{a}.{b}.ue8m0"),
    "nvidia_blackwell_mxfp4": ("tcgen05mma_block_scale", "Blackwell",
                               "m128n8k64.block32.f32.{a}.{b}.ue8m0"),
}
PTX_TYPES = {"float16": "f16", "bfloat16": "bf16", "tensorfloat32": "tf32",
             "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2",
             "mxfp8_e4m3": "e4m3", "mxfp8_e5m2": "e5m2", "mxfp4_e2m1": "e2m1"}


def _packed_fp4(x, axis):
    """FP4 (E2M1) values `x` as MMA-Sim's packed uint8: two codes per byte along `axis`
    (the even element in the low nibble)."""
    import torch  # noqa: PLC0415
    from mmasim.isa.common import encode_fp4  # noqa: PLC0415

    codes = torch.tensor([encode_fp4(float(v)) for v in x.flatten()], dtype=torch.uint8)
    codes = codes.reshape(x.shape).movedim(axis, -1)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.movedim(-1, axis).contiguous()


def _padded(x, shape, fill=0.0):
    """`x` in the top-left corner of a `shape` tensor of `fill`, same dtype."""
    import torch  # noqa: PLC0415

    out = torch.full(shape, fill, dtype=torch.float32).to(x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def _instruction_products(instruction, a, b, a_scales, b_scales, chunk):
    """a [R, K] @ b [K] by `instruction` (m x k per call, b in column 0 of n), chained
    through its accumulator; with `chunk`, the accumulator is added into an FP32 total
    every `chunk` products (DeepSeek's promotion); MX operands with their scales."""
    import torch  # noqa: PLC0415

    m, n, k = instruction.m, instruction.n, instruction.k
    rows, depth = a.shape
    steps = max(1, -(-depth // k))
    a = _padded(a, (-(-rows // m) * m, steps * k))
    b = _padded(b[:, None], (steps * k, n))
    blocks = 1
    if a_scales is not None:  # blocks of 32, one or two per instruction; past K,
        blocks = k // instruction.block_size  # E8M0's least (an all-zero block's)
        a_scales = _padded(a_scales, (a.shape[0], steps * blocks), 2.0 ** -127)
        b_scales = _padded(b_scales[:, None], (steps * blocks, n), 2.0 ** -127)
    if instruction_packing(instruction) == 2:  # kind::mxf4nvf4 takes packed FP4
        a, b = _packed_fp4(a, 1), _packed_fp4(b, 0)
    width = k // instruction_packing(instruction)
    out = []
    for top in range(0, a.shape[0], m):
        c = total = torch.zeros((m, n), dtype=torch.float32)
        for step in range(steps):
            operands = (a[top:top + m, step * width:(step + 1) * width].contiguous(),
                        b[step * width:(step + 1) * width].contiguous(), c)
            if a_scales is not None:
                scales = slice(step * blocks, (step + 1) * blocks)
                operands += (a_scales[top:top + m, scales].contiguous(),
                             b_scales[scales].contiguous())
            c = instruction(*operands)
            if chunk and (((step + 1) * k) % chunk == 0 or step + 1 == steps):
                total, c = total + c, torch.zeros_like(c)
        out.append(total if chunk else c)
    return torch.cat(out)[:rows, 0].numpy()


def instruction_packing(instruction):
    """Elements per stored operand value (2: packed FP4)."""
    return getattr(instruction, "packing", 1)


def instructions(path):
    from mmasim.simulator import nv_ptx  # noqa: PLC0415

    data = np.load(path, allow_pickle=True)
    total, differ = {}, {}
    for key, name, a_type, b_type, _, _, _, chunk in data["index"]:
        kind, arch, pattern = INSTRUCTIONS[name]
        instruction = getattr(nv_ptx, kind)(
            arch, pattern.format(a=PTX_TYPES[a_type], b=PTX_TYPES[b_type]))
        expected = _instruction_products(
            instruction, *_operands(data, key, a_type, b_type), int(chunk))
        _compare(key, name, expected, data[key + "/got"], total, differ)
    for name in total:
        kind, arch, _ = INSTRUCTIONS[name]
        print(f"{name:32s} {arch} {kind} {total[name]:5d} dot products, {differ[name]} differ")
    print(f"all: {sum(total.values())} dot products, {sum(differ.values())} differ")


if __name__ == "__main__":
    {"write": write, "check": check, "instructions": instructions}[sys.argv[1]](sys.argv[2])
