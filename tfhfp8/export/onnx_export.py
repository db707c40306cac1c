"""A tfhfp8 model as an ONNX graph with QuantizeLinear / DequantizeLinear.

The model's inference function is traced with every quantization replaced by a marker
(`markers`), converted by tf2onnx (opset 18, the highest it writes), brought to the
lowest opset that has the types the quantizations need (`onnx_formats`: 19 for
float8, 21 for INT16 and blocks), and each marker is rewritten as QDQ (`qdq`).
"""

import onnx
import tensorflow as tf
from onnx import helper, version_converter

from tfhfp8 import ops
from tfhfp8.export import markers, onnx_formats, qdq
from tfhfp8.layers import EmulatedLayer, walk

TF2ONNX_OPSET = 18
# Operators whose meaning changed between opsets 18 and 21 (the rest only gained
# types): a graph holding one is converted by onnx.version_converter.
_CHANGED_BY_21 = {"DFT", "GridSample", "GroupNormalization", "Resize", "Pad", "AveragePool"}


def check_layers(model):
    """A ValueError naming the first emulated layer whose inference ONNX cannot hold."""
    for layer in walk(model, sublayers=True, any_model=True):
        if not isinstance(layer, EmulatedLayer):
            continue
        policy = layer.policy
        if policy.accumulation["forward"].emulates:
            raise ValueError(
                f"layer {layer.name!r} ({type(layer).__name__}): policy {policy.name!r} "
                f"sums its products in {policy.accumulation['forward']}; ONNX operators "
                "sum in FP32. Export a policy with FP32 accumulation (accumulation=None)")
        for role in ("weights", "activations"):
            fmt = policy.formats[role]
            if fmt is None:
                continue
            try:
                onnx_formats.plan(fmt, policy.rounding[role], policy.saturate)
            except ValueError as error:
                raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}), "
                                 f"{role}: {error}") from None


def input_specs(model):
    """The model's inputs as (structure, flat list of tf.TensorSpec)."""
    try:
        structure = model.input  # a Functional model's own structure (a dict, ...)
    except AttributeError:  # a Sequential model never called: its one input
        structure = model.inputs[0] if len(model.inputs) == 1 else list(model.inputs)
    flat = tf.nest.flatten(structure)
    specs = [tf.TensorSpec(tuple(t.shape), t.dtype, name=_input_name(t, i))
             for i, t in enumerate(flat)]
    return structure, specs


def _input_name(tensor, index):
    name = getattr(tensor, "name", None) or f"input_{index}"
    return name.split(":")[0].replace("/", "_")


def to_onnx(model):
    """The ONNX ModelProto of `model` in inference mode, and the opset it uses."""
    import tf2onnx  # noqa: PLC0415 (an optional dependency: the `export` extra)

    check_layers(model)
    structure, specs = input_specs(model)
    marking = markers.Markers()

    @tf.function(autograph=False)
    def serve(*flat):
        marking.anchor = tf.shape(flat[0])[0]
        return model(tf.nest.pack_sequence_as(structure, list(flat)), training=False)

    with ops.forced_backend(marking):
        serve.get_concrete_function(*specs)
        proto, _ = tf2onnx.convert.from_function(
            serve, input_signature=specs, opset=TF2ONNX_OPSET,
            custom_op_handlers=dict(markers.HANDLERS),
            extra_opset=[helper.make_opsetid(markers.DOMAIN, 1)])
    plans = _plans(proto, marking.specs)
    opset = max([TF2ONNX_OPSET] + [plan.opset for plan in plans.values()])
    proto = _to_opset(proto, opset)
    _rewrite(proto, plans, marking.specs)
    _check_converted(proto)
    return proto, opset


def _marker_nodes(graph):
    return [n for n in graph.node if n.domain == markers.DOMAIN and n.op_type == markers.OP]


def _attr(node, name):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _plans(proto, specs):
    plans = {}
    for node in _marker_nodes(proto.graph):
        spec = specs[_attr(node, "index")]
        plans[node.name] = onnx_formats.plan(spec.fmt, spec.rounding, spec.saturate)
    return plans


def _to_opset(proto, opset):
    """`proto` at `opset`: the version number raised where no operator in it changed
    meaning, else through onnx.version_converter."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < opset:
            if any(n.op_type in _CHANGED_BY_21 for n in proto.graph.node):
                return version_converter.convert_version(proto, opset)
            entry.version = opset
    return proto


def _rewrite(proto, plans, specs):
    graph = proto.graph
    rw = qdq.Rewriter(graph)
    nodes = []
    for node in list(graph.node):
        if node.name not in plans or node.domain != markers.DOMAIN:
            nodes.append(node)
            continue
        spec, plan, rank = specs[_attr(node, "index")], plans[node.name], _attr(node, "rank")
        rw.stem, rw.nodes = node.name, []
        if node.input[0] in rw.initializers:
            qdq.rewrite_weight(rw, node, plan, spec)
        else:
            qdq.rewrite_activation(rw, node, plan, None if rank < 0 else rank)
        nodes.extend(rw.nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    qdq.fold_layout(graph)
    qdq.drop_unused_initializers(graph)
    keep = [e for e in proto.opset_import if e.domain != markers.DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    opset = max(e.version for e in keep if e.domain in ("", "ai.onnx"))
    proto.ir_version = 10 if opset >= 21 else 9 if opset >= 19 else 8


def _check_converted(proto):
    """A ValueError naming each TensorFlow op tf2onnx left unconverted."""
    missing = []
    for node in _all_nodes(proto.graph):
        if node.domain not in ("", "ai.onnx") or not onnx.defs.has(node.op_type):
            missing.append(f"{node.op_type} ({node.name})")
    if missing:
        raise ValueError(
            "the exporter cannot express these operations in ONNX (TensorFlow op and "
            "node, whose name starts with its layer's): " + ", ".join(missing[:10]) +
            (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)

