"""Folding BatchNormalization into the convolution or dense layer before it."""

import keras
import numpy as np

from tfhfp8 import _compat
from tfhfp8.calibration.graph import BN, is_model


_FOLDABLE = (
    keras.layers.Dense,
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
    keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose,
)


def _channel_axis(layer, rank):
    """The output channel axis (non-negative) of a foldable layer's output."""
    if isinstance(layer, keras.layers.Dense):
        return rank - 1
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else rank - 1


def _is_linear(activation):
    return activation is None or activation is keras.activations.linear or getattr(
        activation, "__name__", "") == "linear"


def _find_folds(model, folds):
    """Adds {id(bn): (bn, layer)} for every BatchNorm that can be folded into `layer`."""
    graph = _compat.functional_graph(model)
    if graph is None:
        return
    nodes = [n for n in _compat.graph_nodes(graph) if not n.is_input and n.operation is not None]
    calls, consumers = {}, {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for t in node.input_tensors:
            consumers[id(t)] = consumers.get(id(t), 0) + 1
    graph_outputs = {id(t) for t in graph.outputs}
    for node in nodes:
        bn = node.operation
        if is_model(bn):
            _find_folds(bn, folds)
            continue
        if not isinstance(bn, BN) or calls[id(bn)] != 1 or len(node.input_tensors) != 1:
            continue
        tensor = node.input_tensors[0]
        layer = _compat.producer(tensor)
        if layer is None:
            continue
        if (not isinstance(layer, _FOLDABLE) or is_model(layer) or calls.get(id(layer)) != 1
                or consumers.get(id(tensor)) != 1 or id(tensor) in graph_outputs
                or not _is_linear(getattr(layer, "activation", None))):
            continue
        rank = len(tensor.shape)
        if bn.axis % rank != _channel_axis(layer, rank) or getattr(bn, "renorm", False):
            continue
        folds[id(bn)] = (bn, layer)


def _folded_weights(layer, bn):
    """The weights (in `layer.weights` order, with a bias) of `layer` followed by `bn`."""
    mean = bn.moving_mean.numpy().astype(np.float64)
    variance = bn.moving_variance.numpy().astype(np.float64)
    gamma = bn.gamma.numpy().astype(np.float64) if bn.scale else np.ones_like(mean)
    beta = bn.beta.numpy().astype(np.float64) if bn.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + bn.epsilon)
    shift = beta - mean * scale
    bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else np.zeros_like(mean)
    if isinstance(layer, keras.layers.SeparableConv2D):
        weights = [layer.depthwise_kernel.numpy(),
                   layer.pointwise_kernel.numpy().astype(np.float64) * scale]
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel = layer.kernel.numpy().astype(np.float64)  # (..., in, depth_multiplier)
        weights = [kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])]
    elif isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                            keras.layers.Conv3DTranspose)):
        kernel = layer.kernel.numpy().astype(np.float64)  # (..., out, in)
        weights = [kernel * scale[:, None]]
    else:
        weights = [layer.kernel.numpy().astype(np.float64) * scale]  # (..., out)
    weights.append(bias * scale + shift)
    return [w.astype(np.float32) for w in weights]


@keras.saving.register_keras_serializable(package="tfhfp8")
class FoldedBatchNormalization(keras.layers.Layer):
    """The identity left where `fold_batchnorm` folded a BatchNormalization layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.built = True

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs, training=None, mask=None):
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype, sparse=inputs.sparse)


def fold_batchnorm(model, verbose=False):
    """A copy of `model` with each BatchNormalization folded into the layer before it.

    A BatchNormalization layer is folded when its input is the output of a Dense or
    convolution layer (Conv1D/2D/3D, DepthwiseConv2D, SeparableConv2D, ConvTranspose)
    with no activation, whose output nothing else reads, both called once, the
    normalization axis being the layer's channel axis. The layer then computes
    `W' = W * s`, `b' = (b - moving_mean) * s + beta` with
    `s = gamma / sqrt(moving_variance + epsilon)` (computed in float64, stored in FP32),
    and the BatchNormalization becomes an identity layer (`FoldedBatchNormalization`)
    of the same name.
    Every other BatchNormalization layer is kept. Nested models are folded too; the
    input model is not modified. Works on FP32 and on emulated (`tfhfp8.layers`) models.

    In inference mode the result computes the same function (to FP32 rounding).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if _compat.functional_graph(model) is None:
        raise TypeError(
            f"fold_batchnorm rewrites Functional and Sequential models; "
            f"{type(model).__name__} has no graph to rewrite (subclassed or unbuilt)")
    folds = {}
    _find_folds(model, folds)
    into = {id(layer): bn for bn, layer in folds.values()}
    clones = {}

    def clone(layer):
        if id(layer) in folds:
            new = FoldedBatchNormalization(name=layer.name)
        else:
            config = layer.get_config()
            if id(layer) in into:
                config["use_bias"] = True
            new = type(layer).from_config(config)
        clones[id(layer)] = (layer, new)
        return new

    folded = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for layer, new in clones.values():
        if id(layer) in folds:
            continue
        if id(layer) in into:
            new.set_weights(_folded_weights(layer, into[id(layer)]))
        else:
            new.set_weights(layer.get_weights())
    if verbose:
        names = ", ".join(f"{bn.name}->{layer.name}" for bn, layer in folds.values())
        print(f"fold_batchnorm: folded {len(folds)} BatchNormalization layer(s): {names}")
    return folded
