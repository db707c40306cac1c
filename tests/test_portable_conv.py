"""Convolutions on every TensorFlow CPU kernel set (oneDNN on or off): channels-first
inputs and dilated transposed convolutions, which TF's Eigen kernels reject.

CI runs the suite with oneDNN as TensorFlow chooses and with TF_ENABLE_ONEDNN_OPTS=0,
so each test here checks both kernel sets; the last one also compares the two in one
run, bit for bit. Integer-valued data keep every FP32 sum exact, so results are
compared with the float64 references of conv_reference.py exactly."""

import itertools
import json
import os
import subprocess
import sys

import conv_reference as reference
import keras
import numpy as np
import pytest
import tensorflow as tf

import tfhfp8
from tfhfp8.gemm import portable_conv

RNG = np.random.default_rng(2024)


def ints(*shape, low=-3, high=4):
    return RNG.integers(low, high, size=shape).astype(np.float32)


def to_first(t):
    return np.moveaxis(t, -1, 1)


def to_last(t):
    return np.moveaxis(t, 1, -1)


def value_and_grads(fn, x, kernel, dy):
    x, kernel = tf.constant(x), tf.Variable(kernel)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x, kernel)
    dx, dw = tape.gradient(y, [x, kernel], output_gradients=tf.constant(dy))
    return y.numpy(), dx.numpy(), dw.numpy()


GEOMETRIES = [  # rank, strides, dilation, padding, spatial size
    (rank, s, d, padding, n)
    for rank, (s, d), padding, n in itertools.product(
        (1, 2, 3), ((1, 1), (2, 1), (1, 2), (3, 2)), ("same", "valid"), (5, 6))
    if rank == 1 or n == 5]


def assert_matches(fn, x, kernel, dy, data_format, expected):
    """fn's (y, dx, dw) on channels-last x and dy (transposed in and out for
    channels_first) equal `expected` bit for bit."""
    first = data_format == "channels_first"
    y, dx, dw = value_and_grads(fn, to_first(x) if first else x, kernel,
                                to_first(dy) if first else dy)
    if first:
        y, dx = to_last(y), to_last(dx)
    for got, want in zip((y, dx, dw), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("rank, s, d, padding, n", GEOMETRIES)
def test_conv_transpose_equals_the_reference(rank, s, d, padding, n, data_format):
    x, kernel = ints(2, *(n,) * rank, 3), ints(*(3,) * rank, 4, 3)
    fn = lambda x, k: portable_conv.conv_transpose(
        x, k, strides=s, padding=padding, dilation_rate=d, data_format=data_format)
    outs = list(keras.ops.conv_transpose(keras.KerasTensor(x.shape),
                                         keras.KerasTensor(kernel.shape), s, padding,
                                         dilation_rate=d).shape[1:-1])
    dz = ints(2, *outs, 4)
    expected_y = reference.conv_transpose(x, kernel, (s,) * rank, (d,) * rank, padding, outs)
    expected_dx, expected_dw = reference.conv_transpose_grads(
        x, kernel, dz, (s,) * rank, (d,) * rank, padding)
    assert_matches(fn, x, kernel, dz, data_format, (expected_y, expected_dx, expected_dw))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("rank, s, d, padding, n", [g for g in GEOMETRIES if g[1] == 1 or g[2] == 1])
def test_conv_equals_the_reference(rank, s, d, padding, n, data_format):
    x, kernel = ints(2, *(n,) * rank, 3), ints(*(3,) * rank, 3, 4)
    fn = lambda x, k: portable_conv.conv(x, k, strides=s, padding=padding, dilation_rate=d,
                                         data_format=data_format)
    expected_y = reference.conv(x, kernel, (s,) * rank, (d,) * rank, padding)
    dy = ints(*expected_y.shape)
    expected_dx, expected_dw = reference.conv_grads(x, kernel, dy, (s,) * rank, (d,) * rank,
                                                    padding)
    assert_matches(fn, x, kernel, dy, data_format, (expected_y, expected_dx, expected_dw))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("s, d", [(1, 1), (2, 1), (1, 2)])
def test_depthwise_conv_equals_the_reference(s, d, data_format):
    x, kernel = ints(2, 7, 6, 3), ints(3, 2, 3, 2)
    expected = reference.depthwise_conv(x, kernel, (s, s), (d, d), "same")
    first = data_format == "channels_first"
    y = portable_conv.depthwise_conv(to_first(x) if first else x, kernel, strides=s,
                                     padding="same", dilation_rate=d, data_format=data_format)
    np.testing.assert_array_equal(to_last(y.numpy()) if first else y.numpy(), expected)


def test_dilated_transpose_needs_static_sizes():
    fn = tf.function(lambda x: portable_conv.conv_transpose(
        x, tf.ones((3, 3, 2, 2)), padding="same", dilation_rate=2),
        input_signature=[tf.TensorSpec((1, None, 4, 2))])
    with pytest.raises(ValueError, match="static spatial input sizes"):
        fn.get_concrete_function()


# -- the emulated layers, channels-first and dilated ---------------------------------
# Each layer type and geometry under four policies: FP32, per-tensor FP8 (nearest),
# emulated FP32-wide sums, and MXFP8 blocks. The channels-first layer computes the
# channels-last one's values bit for bit, on every kernel set.
EXACT_SUMS = tfhfp8.Accumulator(tfhfp8.FloatFormat(8, 21))
POLICIES = {
    "float32": lambda: "float32",
    "fp8": lambda: tfhfp8.Policy(weights="float8_e4m3", activations="float8_e4m3",
                                 errors="float8_e5m2"),
    "sums": lambda: tfhfp8.Policy(weights="float8_e4m3", activations="float16",
                                  errors="float16", accumulation=EXACT_SUMS),
    "mxfp8": lambda: tfhfp8.Policy(weights="mxfp8_e4m3", activations="mxfp8_e4m3",
                                   errors="mxfp8_e5m2"),
}
LAYERS = {  # name: (class name, kwargs, channels-last input shape)
    "conv1d_causal_dilated": ("Conv1D", dict(filters=3, kernel_size=3, padding="causal",
                                             dilation_rate=2), (2, 9, 2)),
    "conv1d_strided": ("Conv1D", dict(filters=3, kernel_size=3, strides=2, padding="same"),
                       (2, 9, 2)),
    "conv2d_strided": ("Conv2D", dict(filters=4, kernel_size=3, strides=2, padding="same"),
                       (2, 7, 6, 3)),
    "conv2d_dilated": ("Conv2D", dict(filters=4, kernel_size=(2, 3), dilation_rate=2),
                       (1, 7, 8, 2)),
    "conv3d_strided": ("Conv3D", dict(filters=3, kernel_size=2, strides=(1, 2, 1),
                                      padding="same"), (1, 4, 5, 4, 2)),
    "depthwise_dilated": ("DepthwiseConv2D", dict(kernel_size=3, depth_multiplier=2,
                                                  dilation_rate=2, padding="same"),
                          (2, 7, 6, 3)),
    "separable_dilated": ("SeparableConv2D", dict(filters=4, kernel_size=2, dilation_rate=2,
                                                  depth_multiplier=2), (1, 6, 5, 3)),
    "transpose_strided": ("Conv2DTranspose", dict(filters=3, kernel_size=3, strides=2,
                                                  padding="same"), (2, 4, 3, 2)),
    "transpose_dilated": ("Conv2DTranspose", dict(filters=3, kernel_size=(2, 3),
                                                  dilation_rate=2, padding="same"),
                          (1, 4, 5, 2)),
    "transpose_dilated_valid": ("Conv2DTranspose", dict(filters=3, kernel_size=3,
                                                        dilation_rate=2), (1, 3, 4, 2)),
}


def layer_results(layer_name, policy_name, data_format, seed=0):
    """y, dx and the gradients of the layer's weights (channels-last arrays), for
    integer-valued inputs, weights and output gradients."""
    cls_name, kwargs, shape = LAYERS[layer_name]
    rng = np.random.default_rng(seed)
    cls = getattr(tfhfp8.layers, cls_name)
    layer = cls(policy=POLICIES[policy_name](), data_format=data_format, name="conv",
                **kwargs)
    x = rng.integers(-4, 5, size=shape).astype(np.float32)
    first = data_format == "channels_first"
    layer.build(to_first(x).shape if first else x.shape)
    layer.set_weights([rng.integers(-3, 4, size=w.shape).astype(np.float32)
                       for w in layer.get_weights()])
    out_shape = layer.compute_output_shape(to_first(x).shape if first else x.shape)
    dy = rng.integers(-4, 5, size=out_shape[:1] + out_shape[2:] + out_shape[1:2]
                      if first else out_shape).astype(np.float32)
    xt = tf.constant(to_first(x) if first else x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
    grads = tape.gradient(y, [xt] + layer.trainable_weights,
                          output_gradients=tf.constant(to_first(dy) if first else dy))
    y, dx = y.numpy(), grads[0].numpy()
    if first:
        y, dx = to_last(y), to_last(dx)
    return [y, dx] + [g.numpy() for g in grads[1:]]


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_channels_first_layers_equal_channels_last(layer_name, policy_name):
    last = layer_results(layer_name, policy_name, "channels_last")
    first = layer_results(layer_name, policy_name, "channels_first")
    assert len(first) == len(last) >= 3
    for a, b in zip(first, last):
        np.testing.assert_array_equal(a, b)


def test_dilated_transposed_layer_equals_the_reference():
    y, dx, dw, db = layer_results("transpose_dilated", "float32", "channels_first")
    _, kwargs, shape = LAYERS["transpose_dilated"]
    rng = np.random.default_rng(0)
    x = rng.integers(-4, 5, size=shape).astype(np.float32)
    kernel = rng.integers(-3, 4, size=dw.shape).astype(np.float32)
    bias = rng.integers(-3, 4, size=db.shape).astype(np.float32)
    expected = reference.conv_transpose(x, kernel, (1, 1), (2, 2), "same", shape[1:3])
    np.testing.assert_array_equal(y, expected + bias)


@pytest.mark.parametrize("cls_name, kwargs, shape", [
    ("Conv1D", dict(kernel_size=2), (1, 3, 5)),
    ("Conv2D", dict(kernel_size=(2, 3), dilation_rate=2), (1, 3, 7, 8)),
    ("Conv3D", dict(kernel_size=2), (1, 2, 3, 3, 5)),
])
def test_channels_first_bias_runs_along_the_channels(cls_name, kwargs, shape):
    # Output width == filters == 4: Keras 3's `ops.add` adds a (1, 4, 1, 1) bias along
    # the last axis there (its bias_add shortcut guesses the layout from the shapes).
    layer = getattr(tfhfp8.layers, cls_name)(4, data_format="channels_first", **kwargs)
    x = ints(*shape)
    layer.build(x.shape)
    kernel, bias = ints(*layer.kernel.shape), ints(4)
    layer.set_weights([kernel, bias])
    rank = len(shape) - 2
    expected = reference.conv(to_last(x), kernel, (1,) * rank,
                              layer.dilation_rate, "valid") + bias
    assert expected.shape[-2] == 4
    np.testing.assert_array_equal(to_last(layer(x).numpy()), expected)


# -- both kernel sets in one run ----------------------------------------------------
_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, "tests")
import test_portable_conv as t
out = {}
for layer in t.LAYERS:
    for policy in ("float32", "sums"):
        for fmt in ("channels_last", "channels_first"):
            out[f"{layer}/{policy}/{fmt}"] = [a.tobytes().hex() for a in
                                              t.layer_results(layer, policy, fmt)]
json.dump(out, sys.stdout)
"""


def _run_with_onednn(flag):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=flag, TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_both_kernel_sets_compute_the_same_bits():
    with_onednn, without = _run_with_onednn("1"), _run_with_onednn("0")
    assert with_onednn.keys() == without.keys() and len(without) == 2 * 2 * len(LAYERS)
    different = [key for key in without if with_onednn[key] != without[key]]
    assert not different
