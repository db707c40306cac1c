"""Rewrites tfhfp8's quantization markers in an ONNX graph as QuantizeLinear /
DequantizeLinear (see `onnx_formats` for the types and `markers` for the markers).

A marker whose input is an initializer (a weight) becomes a DequantizeLinear of the
weight's stored codes and scales (or a Cast of a 16-bit initializer): the file holds
the quantized weight, not FP32. Any other marker (an activation) becomes
QuantizeLinear -> DequantizeLinear; dynamic fixed point and MX compute their
power-of-two scales from the tensor in the graph, exactly as tfhfp8 does (the
exponent of max|x| is found by counting the powers of two it reaches, so no
logarithm rounds it).
"""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tfhfp8.export import onnx_formats

# Powers of two 2^-164 .. 2^127 (float64) and 2^-149 .. 2^127 (float32, every one that
# float32 holds): the tables the graph compares against and picks scales from.
_LOW64, _LOW32 = -164, -149
_POW2_64 = np.ldexp(1.0, np.arange(_LOW64, 128))
_POW2_32 = np.ldexp(1.0, np.arange(_LOW32, 128)).astype(np.float32)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class Rewriter:
    """Builds new nodes and initializers with unique names into `graph`."""

    def __init__(self, graph):
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.used = {name for node in graph.node for name in node.output}
        self.used |= set(self.initializers) | {i.name for i in graph.input}
        self.nodes = []  # the nodes being emitted for the current marker
        self.small = {}  # (dtype, shape, bytes) of small constants -> their one name

    def name(self, stem):
        index, candidate = 0, stem
        while candidate in self.used:
            index += 1
            candidate = f"{stem}_{index}"
        self.used.add(candidate)
        return candidate

    def constant(self, stem, array):
        """A new initializer; small ones (scalars, shapes) are shared by value."""
        array = np.asarray(array)
        if array.size <= 8:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key not in self.small:
                self.small[key] = self.shared(self.name(f"tfhfp8/{stem.split('/')[-1]}"),
                                              array)
            return self.small[key]
        name = self.name(stem)
        init = numpy_helper.from_array(array, name)
        self.graph.initializer.append(init)
        self.initializers[name] = init
        return name

    def shared(self, name, array):
        """An initializer by a fixed name, created once (the power-of-two tables)."""
        if name not in self.initializers:
            self.used.add(name)
            init = numpy_helper.from_array(np.asarray(array), name)
            self.graph.initializer.append(init)
            self.initializers[name] = init
        return name

    def node(self, op, inputs, output=None, **attrs):
        output = output or self.name(f"{self.stem}/{op}")
        self.nodes.append(helper.make_node(op, list(inputs), [output],
                                           name=self.name(f"{self.stem}/{op}_node"), **attrs))
        return output


def rewrite_weight(rw, marker, plan, spec):
    """The DequantizeLinear (or Cast) of the stored codes of the initializer that
    `marker` reads; `spec` (a `markers.Spec`) rounds it as tfhfp8 does."""
    values = numpy_helper.to_array(rw.initializers[marker.input[0]]).astype(np.float32)
    rounded = spec.quantize(values)
    out = marker.output[0]
    if plan.kind == "cast":
        stored = rw.constant(f"{rw.stem}/weight_float16", rounded.astype(plan.dtype))
        rw.node("Cast", [stored], out, to=TensorProto.FLOAT)
        return
    if plan.kind == "float":
        scales = scale = np.float32(plan.scale)
        attrs = {}
    elif plan.kind == "dfp":
        scales = scale = np.float32(np.ldexp(1.0, spec.dfp_exponent(values)))
        attrs = {}
    else:  # MX: one power-of-two scale per block along the last axis
        exponent = onnx_formats.block_exponents(values, plan)
        scales = (np.ldexp(1.0, exponent) * plan.scale).astype(np.float32)
        scale = np.repeat(scales, plan.block_size, axis=-1)[..., :values.shape[-1]]
        attrs = dict(axis=values.ndim - 1, block_size=plan.block_size)
    stored = rw.constant(f"{rw.stem}/weight_codes", onnx_formats.codes(plan, rounded, scale))
    scale_name = rw.constant(f"{rw.stem}/weight_scale", scales)
    rw.node("DequantizeLinear", [stored, scale_name], out, **attrs)


def rewrite_activation(rw, marker, plan, rank):
    """QuantizeLinear -> DequantizeLinear of the tensor `marker` reads."""
    x, out = marker.input[0], marker.output[0]
    if plan.kind == "cast":
        if plan.clip is not None:
            low = rw.constant(f"{rw.stem}/min", np.float32(-plan.clip))
            high = rw.constant(f"{rw.stem}/max", np.float32(plan.clip))
            x = rw.node("Clip", [x, low, high])
        rw.node("Cast", [rw.node("Cast", [x], to=plan.onnx_type)], out, to=TensorProto.FLOAT)
        return
    if plan.kind == "float":
        scale = rw.constant(f"{rw.stem}/scale", np.float32(plan.scale))
        # No zero point (opset 21's output_dtype): ONNX Runtime 1.32 drops a ReLU
        # before a float8 QuantizeLinear that has one (it reads it as an integer
        # type's minimum, for which the ReLU would be redundant).
        q = rw.node("QuantizeLinear", [x, scale], output_dtype=plan.onnx_type,
                    saturate=int(plan.saturate))
        rw.node("DequantizeLinear", [q, scale], out)
        return
    if plan.kind == "dfp":
        scale = _dfp_scale(rw, x, plan)
        limit = rw.node("Mul", [scale, rw.constant(f"{rw.stem}/max_mantissa",
                                                   np.float32(plan.clip))])
        clipped = rw.node("Clip", [x, rw.node("Neg", [limit]), limit])
        q = rw.node("QuantizeLinear", [clipped, scale], output_dtype=plan.onnx_type)
        rw.node("DequantizeLinear", [q, scale], out)
        return
    if rank is None:
        raise ValueError("MX activations need a tensor of known rank to block")
    scale = _mx_scales(rw, x, plan, rank)
    blocked = dict(axis=rank - 1, block_size=plan.block_size)
    q = rw.node("QuantizeLinear", [x, scale], output_dtype=plan.onnx_type, saturate=1,
                **blocked)
    if plan.clip is not None:  # MXINT8 is symmetric: -128 is no code
        q = rw.node("Clip", [q, rw.constant(f"{rw.stem}/min", np.int8(-127))])
    rw.node("DequantizeLinear", [q, scale], out, **blocked)


def _floor_log2(rw, amax):
    """floor(log2(amax)) as int32 (amax float32 >= 0; 0 gives -150): how many of the
    float32 powers of two amax reaches."""
    table = rw.shared("tfhfp8/pow2_float32", _POW2_32)
    reached = rw.node("Cast", [rw.node("GreaterOrEqual", [amax, table])], to=TensorProto.INT32)
    count = rw.node("ReduceSum", [reached, rw.constant(f"{rw.stem}/last", np.array([-1]))],
                    keepdims=0)
    return rw.node("Add", [count, rw.constant(f"{rw.stem}/offset", np.int32(_LOW32 - 1))])


def _dfp_scale(rw, x, plan):
    """2^E_s with E_s = E_max - (bits - 2), one more when max|x| would round up to
    2^(bits-1), at least -149; max over the finite elements (tfhfp8.ops.tf_backend)."""
    magnitude = rw.node("Abs", [x])
    bad = rw.node("Or", [rw.node("IsInf", [magnitude]), rw.node("IsNaN", [magnitude])])
    finite = rw.node("Where", [bad, rw.constant(f"{rw.stem}/zero", np.float32(0)), magnitude])
    amax = rw.node("ReduceMax", [finite], keepdims=0)
    e_max = _floor_log2(rw, rw.node("Unsqueeze", [amax, rw.constant(f"{rw.stem}/axis",
                                                                    np.array([0]))]))
    shift = plan.bits - 2
    # max|x| >= (2^(bits-1) - 1/2) * 2^(E_max - shift) rounds up: compared in float64.
    index = rw.node("Add", [e_max, rw.constant(f"{rw.stem}/index64",
                                               np.int32(-shift - _LOW64))])
    power = rw.node("Gather", [rw.shared("tfhfp8/pow2_float64", _POW2_64), index])
    threshold = rw.node("Mul", [power, rw.constant(f"{rw.stem}/half_limit",
                                                   np.float64(2.0 ** (plan.bits - 1) - 0.5))])
    bump = rw.node("Cast", [rw.node("GreaterOrEqual", [rw.node("Cast", [amax],
                                                              to=TensorProto.DOUBLE),
                                                      threshold])], to=TensorProto.INT32)
    exponent = rw.node("Add", [rw.node("Add", [e_max, bump]),
                               rw.constant(f"{rw.stem}/shift", np.int32(-shift))])
    exponent = rw.node("Max", [exponent, rw.constant(f"{rw.stem}/min_exponent",
                                                     np.int32(_LOW32))])
    index = rw.node("Add", [exponent, rw.constant(f"{rw.stem}/index32", np.int32(-_LOW32))])
    return rw.node("Gather", [rw.shared("tfhfp8/pow2_float32", _POW2_32), index])


def _mx_scales(rw, x, plan, rank):
    """Per block of `block_size` along the last axis: 2^clip(floor(log2(amax)) - emax,
    -127, 127) (OCP MX 'floor'; an infinity counts as the largest float32)."""
    magnitude = rw.node("Min", [rw.node("Abs", [x]),
                                rw.constant(f"{rw.stem}/float32_max", np.float32(_FLOAT32_MAX))])
    size = rw.node("Shape", [x], start=rank - 1)
    blocks = rw.node("Div", [rw.node("Add", [size, rw.constant(
        f"{rw.stem}/round_up", np.array([plan.block_size - 1]))]),
        rw.constant(f"{rw.stem}/block_size", np.array([plan.block_size]))])
    padding = rw.node("Sub", [rw.node("Mul", [blocks, rw.constant(
        f"{rw.stem}/block", np.array([plan.block_size]))]), size])
    pads = rw.node("Concat", [rw.constant(f"{rw.stem}/no_pads", np.zeros(2 * rank - 1, np.int64)),
                              padding], axis=0)
    padded = rw.node("Pad", [magnitude, pads])
    shape = rw.node("Concat", [rw.constant(f"{rw.stem}/keep", np.zeros(rank - 1, np.int64)),
                               blocks, rw.constant(f"{rw.stem}/block_shape",
                                                   np.array([plan.block_size]))], axis=0)
    amax = rw.node("ReduceMax", [rw.node("Reshape", [padded, shape]),
                                 rw.constant(f"{rw.stem}/last_axis", np.array([-1]))],
                   keepdims=1)
    exponent = rw.node("Add", [_floor_log2(rw, amax),
                               rw.constant(f"{rw.stem}/emax", np.int32(-plan.emax))])
    exponent = rw.node("Clip", [exponent, rw.constant(f"{rw.stem}/lowest", np.int32(-127)),
                                rw.constant(f"{rw.stem}/highest", np.int32(127))])
    index = rw.node("Add", [exponent, rw.constant(f"{rw.stem}/index32", np.int32(-_LOW32))])
    scale = rw.node("Gather", [rw.shared("tfhfp8/pow2_float32", _POW2_32), index])
    if plan.scale != 1.0:
        scale = rw.node("Mul", [scale, rw.constant(f"{rw.stem}/element_scale",
                                                   np.float32(plan.scale))])
    return scale


def fold_layout(graph):
    """Moves Transpose / Reshape / Squeeze / Unsqueeze of a weight with one scale
    (per tensor) into its stored codes, so that DequantizeLinear (or Cast) feeds the
    operator, the pattern runtimes fuse."""
    changed = True
    while changed:
        changed = False
        inits = {init.name: init for init in graph.initializer}
        consumers = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        outputs = {o.name for o in graph.output}
        for node in list(graph.node):
            if not _per_tensor_weight(node, inits, consumers):
                continue
            users = consumers.get(node.output[0], [])
            if len(users) != 1 or node.output[0] in outputs:
                continue
            layout = users[0]
            codes = numpy_helper.to_array(inits[node.input[0]])
            moved = _apply_layout(layout, codes, inits)
            if moved is None:
                continue
            inits[node.input[0]].CopyFrom(numpy_helper.from_array(moved, node.input[0]))
            node.output[0] = layout.output[0]
            graph.node.remove(layout)
            changed = True
            break


def _per_tensor_weight(node, inits, consumers):
    if node.op_type not in ("DequantizeLinear", "Cast") or node.input[0] not in inits:
        return False
    if len(consumers.get(node.input[0], [])) != 1:
        return False
    if node.op_type == "Cast":
        return True
    return all(name in inits and not numpy_helper.to_array(inits[name]).shape
               for name in node.input[1:])


def _apply_layout(layout, codes, inits):
    if layout.op_type == "Transpose":
        perm = next((list(a.ints) for a in layout.attribute if a.name == "perm"), None)
        return np.transpose(codes, perm)
    if layout.op_type not in ("Reshape", "Squeeze", "Unsqueeze") or any(
            a.name == "allowzero" and a.i for a in layout.attribute):
        return None
    if len(layout.input) < 2 or layout.input[1] not in inits:
        return None
    arg = numpy_helper.to_array(inits[layout.input[1]]).astype(np.int64)
    if layout.op_type == "Reshape":
        shape = [codes.shape[i] if d == 0 else d for i, d in enumerate(arg)]
        return codes.reshape(shape)
    if layout.op_type == "Squeeze":
        return np.squeeze(codes, axis=tuple(int(a) for a in arg))
    return np.expand_dims(codes, axis=tuple(int(a) for a in arg))


def drop_unused_initializers(graph):
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


