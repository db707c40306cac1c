r"""tfhfp8's fused accumulators against MMA-Sim (microsoft/MMA-Sim, MIT), bit for bit.

MMA-Sim needs PyTorch, which the project does not depend on: the check runs in two
environments, the project's and a scratch one with PyTorch and MMA-Sim's sources.

    .venv/bin/python -m models.tensor_cores.mmasim_check write /tmp/fused_cases.npz
    PYTHONPATH=/path/to/MMA-Sim /tmp/torch-venv/bin/python \
        models/tensor_cores/mmasim_check.py check /tmp/fused_cases.npz

`write` draws, for every named accumulator of `tfhfp8.fused_accumulation.HARDWARE`,
dot products of random values of the instruction's input types (zeros and subnormals
included, random signs; K from 1 to 300, not multiples of the group) and adversarial
ones (cancellation, values spanning the whole format), and stores them with tfhfp8's
results. `check` recomputes each with MMA-Sim's `nv_fused_dot_add` (one call per group
of the instruction, chained through the accumulator, as its `mma` / `wgmma` /
`tcgen05mma` models chain them; DeepSeek's promotion as an FP32 add every 128
products) and counts the results that differ in any bit.
"""

import sys

import numpy as np

KS = (1, 7, 32, 33, 100, 257, 300)
ROWS = 24


def _cases(acc, rng):
    """(a [R, K], b [K]) per K for accumulator `acc` (tfhfp8 side only)."""
    import tfhfp8  # noqa: PLC0415

    a_type, b_type = acc.input_types[0], acc.input_types[-1]
    values_a = tfhfp8.formats.get(a_type).values()
    values_b = tfhfp8.formats.get(b_type).values()
    for k in KS:
        a = rng.choice(values_a, (ROWS, k)) * rng.choice([-1.0, 1.0], (ROWS, k))
        b = rng.choice(values_b, k) * rng.choice([-1.0, 1.0], k)
        a[0] = np.resize([values_a[-1], -values_a[-1], values_a[1], values_a[2]], k)
        a[1] = np.where(rng.random(k) < 0.5, values_a[-1], values_a[1])
        yield a_type, b_type, a.astype(np.float32), b.astype(np.float32)


def write(path):
    import tfhfp8  # noqa: PLC0415
    from tfhfp8.fused_accumulation import HARDWARE  # noqa: PLC0415

    rng = np.random.default_rng(0)
    arrays, index = {}, []
    for name, acc in HARDWARE.items():
        for a_type, b_type, a, b in _cases(acc, rng):
            got = tfhfp8.matmul(a, b[:, None], acc, a_format=a_type, b_format=b_type)
            key = f"{name}/{a.shape[1]}"
            arrays[key + "/a"], arrays[key + "/b"] = a, b
            arrays[key + "/got"] = got.numpy()[:, 0]
            index.append((key, name, a_type, b_type, acc.group_size, acc.fraction_bits,
                          acc.output, acc.chunk_size or 0))
    np.savez(path, index=np.array(index, dtype=object), **arrays)
    print(f"{len(index)} cases, {sum(a.shape[0] for k, a in arrays.items() if k.endswith('/a'))}"
          f" dot products -> {path}")


def check(path):
    import torch  # noqa: PLC0415
    from mmasim.simulator.arithmetic import nv_fused_dot_add  # noqa: PLC0415

    types = {"float16": torch.float16, "bfloat16": torch.bfloat16,
             "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
    outputs = {"float32": "f32", "e8m13": "f32_e8m13", "float16": "f16"}
    data = np.load(path, allow_pickle=True)
    total, differ = {}, {}
    for key, name, a_type, b_type, group, bits, output, chunk in data["index"]:
        a = torch.tensor(data[key + "/a"]).to(types[a_type])
        b = torch.tensor(data[key + "/b"]).to(types[b_type])
        got = data[key + "/got"]
        for row in range(a.shape[0]):
            c = torch.tensor(0.0, dtype=torch.float32)
            promoted = torch.tensor(0.0, dtype=torch.float32)
            k = a.shape[1]
            for start in range(0, k, group):
                x = torch.zeros(group, dtype=a.dtype)
                y = torch.zeros(group, dtype=b.dtype)
                x[:min(group, k - start)] = a[row, start:start + group]
                y[:min(group, k - start)] = b[start:start + group]
                c = nv_fused_dot_add(x, y, c, int(bits), outputs[output]).float()
                if chunk and ((start + group) % int(chunk) == 0 or start + group >= k):
                    promoted, c = promoted + c, torch.tensor(0.0, dtype=torch.float32)
            expected = (promoted if chunk else c).numpy()
            same = expected.view(np.uint32) == np.float32(got[row]).view(np.uint32)
            same = same or (np.isnan(expected) and np.isnan(got[row]))
            total[name] = total.get(name, 0) + 1
            differ[name] = differ.get(name, 0) + (not same)
            if not same:
                print(f"DIFFER {key} row {row}: MMA-Sim {expected!r}, tfhfp8 {got[row]!r}")
    for name in total:
        print(f"{name:32s} {total[name]:5d} dot products, {differ[name]} differ")
    print(f"all: {sum(total.values())} dot products, {sum(differ.values())} differ")


if __name__ == "__main__":
    {"write": write, "check": check}[sys.argv[1]](sys.argv[2])
