"""Marks each quantization of a traced model with an op that tf2onnx keeps.

While a model is traced under `Markers()` (a backend for
`tfhfp8.ops.forced_backend`), every `tfhfp8.quantize` leaves, instead of its rounding,
a TensorFlow `Print` op (first_n=0: it never prints) whose message is
`tfhfp8-quantize:<index>` and the `Spec` of that quantization at `index`. Its second
input, the batch size of the model's input, keeps tf2onnx from evaluating it on a
constant (a weight) before conversion; `convert_handler` turns it into the ONNX node
`ai.tfhfp8.Quantize`, which `tfhfp8.export.qdq` then replaces.

`HANDLERS` also converts the TensorFlow ops of Keras layers that tf2onnx lacks.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from tfhfp8.ops import tf_backend
from tfhfp8.quantization import quantize

DOMAIN = "ai.tfhfp8"
OP = "Quantize"
_PREFIX = "tfhfp8-quantize:"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One quantization of the model: its format, rounding and saturation."""

    fmt: object
    rounding: str
    saturate: bool

    def quantize(self, values):
        """`values` rounded as the emulated layer rounds them (float32 numpy)."""
        return quantize(values, self.fmt, rounding=self.rounding,
                        saturate=self.saturate).numpy()

    def dfp_exponent(self, values):
        """The shared exponent E_s of a per-tensor DynamicFixedPoint tensor."""
        exponent, _ = tf_backend.shared_exponents(tf.constant(values), self.fmt, self.rounding)
        return int(exponent.numpy()[0])


class Markers:
    """A quantizer backend that records quantizations and leaves marker ops."""

    def __init__(self):
        self.specs = []
        self.anchor = None  # a non-constant int32 scalar of the traced graph

    def _mark(self, x, fmt, rounding, saturate):
        if self.anchor is None:
            raise RuntimeError("Markers.anchor must be set while tracing")
        self.specs.append(Spec(fmt, rounding, bool(saturate)))
        return tf.raw_ops.Print(input=x, data=[self.anchor],
                                message=f"{_PREFIX}{len(self.specs) - 1}", first_n=0)

    def quantize_float(self, x, fmt, rounding, saturate, seed):
        return self._mark(x, fmt, rounding, saturate)

    def quantize_dfp(self, x, fmt, rounding, saturate, seed):
        return self._mark(x, fmt, rounding, saturate)

    def quantize_block(self, x, fmt, rounding, saturate, seed):
        return self._mark(x, fmt, rounding, saturate)

    def quantize_fixed(self, x, exponent, inner, bits, rounding, saturate, seed):
        raise ValueError(f"block floating point (DynamicFixedPoint with block_size) is not "
                         f"exported: ONNX would need one INT{bits} scale per block of a "
                         "tensor computed in the graph; use per-tensor DynamicFixedPoint")


def convert_handler(ctx, node, name, args):
    """tf2onnx handler of `Print`: a marker becomes `ai.tfhfp8.Quantize(index, rank)`."""
    message = node.get_attr_str("message")
    if not message.startswith(_PREFIX):
        raise ValueError(f"tf.raw_ops.Print ({node.name}) has no ONNX equivalent; only "
                         "tfhfp8's quantization markers are converted")
    shape = ctx.get_shape(node.input[0])
    ctx.replace_inputs(node, node.input[:1])
    for attr in list(node.attr):
        del node.attr[attr]
    node.type, node.domain = OP, DOMAIN
    node.set_attr("index", int(message[len(_PREFIX):]))
    node.set_attr("rank", -1 if shape is None else len(shape))
    return node



def erfc_handler(ctx, node, name, args):
    """tf2onnx handler of `Erfc` (Keras' exact GELU), which tf2onnx lacks:
    `1 - Erf(x)`, within float32 rounding of TensorFlow's (absolutely; GELU multiplies
    it by x / 2, so its relative error matters only where GELU is ~0)."""
    dtype = ctx.get_dtype(node.input[0])
    erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=node.name)
    one = ctx.make_const(f"{node.name}/one", np.ones((), np.float32 if dtype == 1 else
                                                    np.float64))
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])
    return node


HANDLERS = {"Print": (convert_handler, []), "Erfc": (erfc_handler, [])}
