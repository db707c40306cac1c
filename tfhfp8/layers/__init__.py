"""Drop-in Keras layers whose GEMMs run in emulated number formats.

Each takes the arguments of the Keras layer of the same name plus `policy=`.
"""

import keras

from tfhfp8 import _compat

from tfhfp8.layers.conv2d_transpose import Conv2DTranspose
from tfhfp8.layers.convolution import Conv1D, Conv2D, Conv3D
from tfhfp8.layers.dense import Dense
from tfhfp8.layers.depthwise_conv2d import DepthwiseConv2D
from tfhfp8.layers.einsum_dense import EinsumDense
from tfhfp8.layers.embedding import Embedding
from tfhfp8.layers.emulation import EmulatedLayer
from tfhfp8.layers.multi_head_attention import MultiHeadAttention
from tfhfp8.layers.separable_conv2d import SeparableConv2D
from tfhfp8.rounding import MasterWeightRounding

# Keras layer class -> its emulated drop-in (exact classes: subclasses may differ).
EMULATED = {
    keras.layers.Dense: Dense,
    keras.layers.EinsumDense: EinsumDense,
    keras.layers.Conv1D: Conv1D,
    keras.layers.Conv2D: Conv2D,
    keras.layers.Conv3D: Conv3D,
    keras.layers.DepthwiseConv2D: DepthwiseConv2D,
    keras.layers.SeparableConv2D: SeparableConv2D,
    keras.layers.Conv2DTranspose: Conv2DTranspose,
    keras.layers.Embedding: Embedding,
    keras.layers.MultiHeadAttention: MultiHeadAttention,
}


def walk(model, sublayers=False, any_model=False):
    """Yields every layer of `model` in order; nested Sequential and Functional models
    (with `any_model=True`, nested models of any kind) are replaced by their own layers.

    With `sublayers=True`, the layers a layer holds inside it (the projections of a
    `MultiHeadAttention`, the layers of a subclassed model) follow that layer.

    The one walk over nested layers of `quantize_model`, `summary`, the PTQ functions
    and `tfhfp8.callbacks.QuantizationStats`.

    >>> import keras, tfhfp8
    >>> inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a")])
    >>> model = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2, name="b")])
    >>> [layer.name for layer in tfhfp8.layers.walk(model)]
    ['a', 'b']
    """
    for layer in model.layers:
        if isinstance(layer, keras.Model) and (any_model or _compat.is_graph_model(layer)):
            yield from walk(layer, sublayers, any_model)
        else:
            yield layer
            if sublayers:
                yield from _compat.sublayers(layer)
