"""Per-tensor FP32 scaling (current and delayed, Keras' float8 recipe) and the blocking
of each GEMM operand along that GEMM's own reduction axis (issue 17, items 2 and 3).

The per-GEMM references below are written out by hand for each layer (numpy GEMMs,
im2col for the convolution) and quantize each operand with `tfhfp8.quantize` and a
`BlockScaled` format whose `axis` names the axis: the block quantizer itself is
checked against gfloat and a `fractions` reference in test_block_formats.py; what is
under test here is which axis each GEMM blocks along.
"""

import functools
import os

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import tfhfp8
from tfhfp8.gemm import axes as gemm_axes

A = tfhfp8.BlockScaled("float4_e2m1fn", block_size=4)  # activations
W = tfhfp8.BlockScaled("float6_e2m3fn", block_size=4)  # weights
E = tfhfp8.BlockScaled("float8_e5m2", block_size=4)  # errors
POLICY = tfhfp8.Policy(weights=W, activations=A, errors=E)


def q(x, fmt, axis):
    """x (numpy) quantized with blocks along one axis."""
    return tfhfp8.quantize(np.asarray(x, np.float32),
                           tfhfp8.BlockScaled(fmt.element, fmt.block_size, axis=axis)).numpy()


def q_merged(x, fmt, axes):
    """Blocks along several adjacent axes merged in order (reshape, then axis -1)."""
    x = np.moveaxis(np.asarray(x), axes, list(range(-len(axes), 0)))
    shape = x.shape
    y = q(x.reshape(shape[:-len(axes)] + (-1,)), fmt, -1).reshape(shape)
    return np.moveaxis(y, list(range(-len(axes), 0)), axes)


def close(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=1e-5,
                               atol=1e-5 * max(np.abs(expected).max(), 1e-30))


def far(actual, expected):
    """The test can tell: a reference with another axis differs clearly."""
    assert np.abs(np.asarray(actual) - expected).max() > 1e-3 * np.abs(expected).max()


def run(layer, x, dy, call=None, grads="all"):
    """y, dx and the gradient of each trainable variable (`grads="kernel"`: the first)."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x) if call is None else call(x)
    variables = layer.trainable_variables[:1 if grads == "kernel" else None]
    dx_dw = tape.gradient(y, [x] + variables, output_gradients=tf.constant(dy))
    return [y.numpy()] + [t.numpy() for t in dx_dw]


RNG = np.random.RandomState(17)


def test_dense_blocks_each_gemm_along_its_reduction_axis():
    x = RNG.randn(2, 5, 10).astype(np.float32)  # batch, tokens, in (partial blocks)
    dy = RNG.randn(2, 5, 6).astype(np.float32)
    layer = tfhfp8.layers.Dense(6, use_bias=False, policy=POLICY)
    layer.build(x.shape)
    w = layer.kernel.numpy()
    y, dx, dw = run(layer, x, dy, grads="kernel")
    x2, dy2 = x.reshape(10, 10), dy.reshape(10, 6)
    close(y.reshape(10, 6), q(x2, A, -1) @ q(w, W, 0))          # y = x W: over `in`
    close(dx.reshape(10, 10), q(dy2, E, -1) @ q(w, W, 1).T)     # dx = dy W^T: over `out`
    close(dw, q(x2, A, 0).T @ q(dy2, E, 0))                     # dW = x^T dy: over tokens
    far(dw, q(x2, A, -1).T @ q(dy2, E, -1))
    far(dx.reshape(10, 10), q(dy2, E, -1) @ q(w, W, 0).T)


def test_einsum_dense_merges_several_reduction_axes():
    # y[a,d] = sum_{b,c} x[a,b,c] W[b,c,d]: forward over (b, c), dx over d, dW over a.
    x = RNG.randn(6, 3, 3).astype(np.float32)
    dy = RNG.randn(6, 5).astype(np.float32)
    layer = tfhfp8.layers.EinsumDense("abc,bcd->ad", output_shape=5, policy=POLICY)
    layer.build(x.shape)
    w = layer.kernel.numpy()
    y, dx, dw = run(layer, x, dy, grads="kernel")
    close(y, np.einsum("abc,bcd->ad", q_merged(x, A, [1, 2]), q_merged(w, W, [0, 1])))
    close(dx, np.einsum("ad,bcd->abc", q(dy, E, 1), q(w, W, 2)))
    close(dw, np.einsum("abc,ad->bcd", q(x, A, 0), q(dy, E, 0)))
    far(y, np.einsum("abc,bcd->ad", q(x, A, 2), q(w, W, 2)))


def _im2col(x, k, pad):
    """(N, H, W, C) -> (N, H, W, k*k*C), stride 1, (kh, kw, c) order, zero padding."""
    n, h, w, c = x.shape
    xp = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    out = np.zeros((n, h, w, k, k, c), x.dtype)
    for i in range(k):
        for j in range(k):
            out[:, :, :, i, j] = xp[:, i:i + h, j:j + w]
    return out.reshape(n, h, w, k * k * c)


def _col2im(cols, shape, k, pad):
    n, h, w, c = shape
    cols = cols.reshape(n, h, w, k, k, c)
    xp = np.zeros((n, h + 2 * pad, w + 2 * pad, c))
    for i in range(k):
        for j in range(k):
            xp[:, i:i + h, j:j + w] += cols[:, :, :, i, j]
    return xp[:, pad:pad + h, pad:pad + w]


def test_conv2d_blocks_channels_x_window_and_batch_x_positions():
    x = RNG.randn(2, 4, 3, 3).astype(np.float32)
    dy = RNG.randn(2, 4, 3, 5).astype(np.float32)
    layer = tfhfp8.layers.Conv2D(5, 3, padding="same", use_bias=False, policy=POLICY)
    layer.build(x.shape)
    wm = layer.kernel.numpy().reshape(27, 5)  # (kh, kw, c) x filters
    y, dx, dw = run(layer, x, dy, grads="kernel")
    cols = _im2col(x, 3, 1).reshape(24, 27)
    dy2 = dy.reshape(24, 5)
    close(y.reshape(24, 5), q(cols, A, -1) @ q(wm, W, 0))
    close(dx, _col2im(q(dy2, E, -1) @ q(wm, W, 1).T, x.shape, 3, 1))
    close(dw.reshape(27, 5), q(cols, A, 0).T @ q(dy2, E, 0))
    far(y.reshape(24, 5), _im2col(q(x, A, -1), 3, 1).reshape(24, 27) @ q(wm, W, 0))


def _depthwise_reference(x, wd, dy):
    """A depthwise convolution (3x3, stride 1, "same") as the per-channel GEMM of its
    patches: y[p, c, m] = sum_w cols[p, w, c] W[w, c, m]. Forward blocks along the
    window w, dx along the multiplier m, dW along batch x positions."""
    n, h, w_, c = x.shape
    m = wd.shape[-1]
    cols = _im2col(x, 3, 1).reshape(n * h * w_, 9, c)
    wm = wd.reshape(9, c, m)
    dy3 = dy.reshape(n * h * w_, c, m)
    y = np.einsum("pwc,wcm->pcm", q(cols, A, 1), q(wm, W, 0))
    dcols = np.einsum("pcm,wcm->pwc", q(dy3, E, 2), q(wm, W, 2))
    dx = _col2im(dcols.reshape(n, h, w_, 9 * c), x.shape, 3, 1)
    dw = np.einsum("pwc,pcm->wcm", q(cols, A, 0), q(dy3, E, 0)).reshape(wd.shape)
    return y.reshape(n, h, w_, c * m), dx, dw


def test_depthwise_conv2d_blocks_the_window_per_channel():
    x = RNG.randn(2, 4, 3, 3).astype(np.float32)
    dy = RNG.randn(2, 4, 3, 6).astype(np.float32)
    layer = tfhfp8.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                          use_bias=False, policy=POLICY)
    layer.build(x.shape)
    wd = layer.kernel.numpy()
    y, dx, dw = run(layer, x, dy)
    for actual, expected in zip((y, dx, dw), _depthwise_reference(x, wd, dy)):
        close(actual, expected)
    # Last-axis blocking (channels for x, channels x multiplier for dy and W) differs.
    last = _depthwise_reference(q(x, A, -1), q(wd, W, -1), q(dy, E, -1))
    far(y, np.einsum("pwc,wcm->pcm", _im2col(q(x, A, -1), 3, 1).reshape(24, 9, 3),
                     q(wd, W, -1).reshape(9, 3, 2)).reshape(y.shape))
    far(dw, last[2])
    far(dx, _col2im(np.einsum("pcm,wcm->pwc", q(dy, E, -1).reshape(24, 3, 2),
                              q(wd, W, -1).reshape(9, 3, 2)).reshape(2, 4, 3, 27),
                    x.shape, 3, 1))


def test_separable_conv2d_blocks_both_products():
    x = RNG.randn(2, 4, 3, 3).astype(np.float32)
    dy = RNG.randn(2, 4, 3, 5).astype(np.float32)
    layer = tfhfp8.layers.SeparableConv2D(5, 3, depth_multiplier=2, padding="same",
                                          use_bias=False, policy=POLICY)
    layer.build(x.shape)
    wd, wp = layer.depthwise_kernel.numpy(), layer.pointwise_kernel.numpy().reshape(6, 5)
    y, dx, dwd, dwp = run(layer, x, dy)
    mid = _depthwise_reference(x, wd, np.zeros((2, 4, 3, 6), np.float32))[0].reshape(24, 6)
    dy2 = dy.reshape(24, 5)
    # The pointwise product is a Dense layer over the channels.
    close(y.reshape(24, 5), q(mid, A, -1) @ q(wp, W, 0))
    close(dwp.reshape(6, 5), q(mid, A, 0).T @ q(dy2, E, 0))
    dmid = (q(dy2, E, -1) @ q(wp, W, 1).T).astype(np.float32).reshape(2, 4, 3, 6)
    _, dx_ref, dwd_ref = _depthwise_reference(x, wd, dmid)
    close(dx, dx_ref)
    close(dwd, dwd_ref)
    far(dwp.reshape(6, 5), q(mid, A, -1).T @ q(dy2, E, -1))


def test_conv2d_transpose_swaps_the_reductions_of_a_convolution():
    # y = col2im(x W^T): forward over input channels; dx = patches(dy) W over window x
    # filters; dW = patches(dy)^T x over batch x positions.
    x = RNG.randn(2, 4, 3, 6).astype(np.float32)
    dy = RNG.randn(2, 4, 3, 3).astype(np.float32)
    layer = tfhfp8.layers.Conv2DTranspose(3, 3, padding="same", use_bias=False, policy=POLICY)
    layer.build(x.shape)
    wm = layer.kernel.numpy().reshape(27, 6)  # (kh, kw, filters) x input channels
    y, dx, dw = run(layer, x, dy)
    x2 = x.reshape(24, 6)
    cols = _im2col(dy, 3, 1).reshape(24, 27)
    close(y, _col2im(q(x2, A, -1) @ q(wm, W, 1).T, dy.shape, 3, 1))
    close(dx.reshape(24, 6), q(cols, E, -1) @ q(wm, W, 0))
    close(dw.reshape(27, 6), q(cols, E, 0).T @ q(x2, A, 0))
    far(dx.reshape(24, 6), _im2col(q(dy, E, -1), 3, 1).reshape(24, 27) @ q(wm, W, 0))
    far(y, _col2im(q(x2, A, -1) @ q(wm, W, 0).T, dy.shape, 3, 1))
    far(dw.reshape(27, 6), q(cols, E, -1).T @ q(x2, A, -1))


def test_conv_patches_equal_the_convolution():
    # The patches GEMM is the convolution: with an element format holding every
    # float32 value, the three GEMMs match Keras' own convolution.
    exact = tfhfp8.BlockScaled(tfhfp8.FloatFormat(8, 23), block_size=8)
    policy = tfhfp8.Policy(weights=exact, activations=exact, errors=exact)
    cases = [(tfhfp8.layers.Conv2D, (2, 7, 6, 3), dict(kernel_size=3, strides=2, padding="same")),
             (tfhfp8.layers.Conv2D, (1, 7, 6, 2), dict(kernel_size=(2, 3), dilation_rate=2)),
             (tfhfp8.layers.Conv1D, (2, 9, 3), dict(kernel_size=3, padding="causal")),
             (tfhfp8.layers.Conv3D, (1, 4, 5, 4, 2), dict(kernel_size=2, strides=(1, 2, 1),
                                                          padding="same")),
             (tfhfp8.layers.Conv2D, (1, 3, 5, 6), dict(kernel_size=3, padding="same",
                                                       data_format="channels_first")),
             (tfhfp8.layers.DepthwiseConv2D, (2, 7, 6, 3),
              dict(kernel_size=3, depth_multiplier=2, strides=2, padding="same")),
             (tfhfp8.layers.DepthwiseConv2D, (1, 3, 7, 6),
              dict(kernel_size=(2, 3), dilation_rate=2, data_format="channels_first")),
             (tfhfp8.layers.SeparableConv2D, (1, 3, 6, 5),
              dict(filters=4, kernel_size=2, strides=2, depth_multiplier=2,
                   data_format="channels_first")),
             (tfhfp8.layers.Conv2DTranspose, (2, 4, 3, 3),
              dict(filters=4, kernel_size=3, strides=2, padding="same")),
             (tfhfp8.layers.Conv2DTranspose, (1, 4, 4, 2),
              dict(filters=3, kernel_size=3, strides=2, output_padding=1)),
             (tfhfp8.layers.Conv2DTranspose, (1, 2, 4, 5),
              dict(filters=3, kernel_size=(2, 3), dilation_rate=2, padding="same",
                   data_format="channels_first"))]
    for cls, shape, kwargs in cases:
        kwargs = {"filters": 4, **kwargs} if cls is not tfhfp8.layers.DepthwiseConv2D else kwargs
        x = RNG.randn(*shape).astype(np.float32)
        ours = cls(policy=policy, **kwargs)
        ours.build(shape)
        ours.set_weights([RNG.randn(*w.shape).astype(np.float32) for w in ours.get_weights()])
        dy = RNG.randn(*ours.compute_output_shape(shape)).astype(np.float32)
        for a, b in zip(run(ours, x, dy), _reference_convolution(ours, kwargs, x, dy)):
            close(a, b)


def _reference_convolution(layer, kwargs, x, dy):
    """y, dx, dW... of `layer`'s convolution by Keras' own layer, channels-last (the
    layout every TensorFlow CPU kernel set runs); a dilated transposed convolution, which
    TF's Eigen kernels reject, by tfhfp8's FP32 layer (its route is checked against
    independent references in test_portable_conv.py)."""
    first = kwargs.get("data_format") == "channels_first"
    dilated = any(d > 1 for d in np.atleast_1d(kwargs.get("dilation_rate", 1)))
    kwargs = {**kwargs, "data_format": "channels_last"}
    if isinstance(layer, tfhfp8.layers.Conv2DTranspose) and dilated:
        plain = type(layer)(policy="float32", **kwargs)
    else:
        plain = getattr(keras.layers, type(layer).__name__)(**kwargs)
    to_last = (lambda t: np.moveaxis(t, 1, -1)) if first else (lambda t: t)
    to_first = (lambda t: np.moveaxis(t, -1, 1)) if first else (lambda t: t)
    plain.build(to_last(x).shape)
    plain.set_weights(layer.get_weights())
    y, dx, *dw = run(plain, to_last(x), to_last(dy), grads="all")
    return [to_first(y), to_first(dx)] + dw


def test_attention_products_block_along_their_own_axes():
    layer = tfhfp8.layers.MultiHeadAttention(num_heads=2, key_dim=6, policy=POLICY)
    x = RNG.randn(1, 5, 4).astype(np.float32)
    layer(x, x)
    equation = layer.attention_spec().scores_equation  # key (a e c d), query (a b c d)
    key = tf.constant(RNG.randn(2, 5, 2, 6).astype(np.float32))
    query = tf.constant(RNG.randn(2, 3, 2, 6).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch([key, query])
        s = layer.emulated_gemm(functools.partial(ops.einsum, equation), [key, query],
                        name="scores", equation=equation)
    ds = RNG.randn(*s.shape).astype(np.float32)
    dk, dq = tape.gradient(s, [key, query], output_gradients=tf.constant(ds))
    k, qq = key.numpy(), query.numpy()
    assert equation == "aecd,abcd->acbe"
    close(s, np.einsum(equation, q(k, A, 3), q(qq, A, 3)))             # over d
    close(dk, np.einsum("acbe,abcd->aecd", q(ds, E, 2), q(qq, A, 1)))  # over b
    close(dq, np.einsum("aecd,acbe->abcd", q(k, A, 1), q(ds, E, 3)))   # over e
    far(dq.numpy(), np.einsum("aecd,acbe->abcd", q(k, A, 3), q(ds, E, 3)))


def test_gemm_axes_of_a_dense_layer():
    spec = gemm_axes.GemmAxes("...i,io->...o", 3, 2)
    assert (spec.forward, spec.input_grad, spec.kernel_grad) == (
        ((2,), (0,)), ((2,), (1,)), ((0, 1), (0, 1)))
    with pytest.raises(ValueError, match="does not match operands of rank"):
        gemm_axes.GemmAxes("ab,bc->ac", 3, 2)


# -- per-tensor scaling -------------------------------------------------------------
def _keras_scale(amax, previous, fmt_max, margin=0):
    return keras.quantizers.compute_float8_scale(
        tf.constant(amax, tf.float32), tf.constant(previous, tf.float32),
        tf.constant(fmt_max, tf.float32), margin)


def test_current_scaling_is_keras_quantize_and_dequantize():
    x = (RNG.randn(64, 33) * 7).astype(np.float32)
    for name, dtype, margin in [("float8_e4m3fn", "float8_e4m3fn", 0),
                                ("float8_e5m2", "float8_e5m2", 2)]:
        fmt = tfhfp8.BlockScaled(name, None, scale="float32", margin=margin)
        scale = _keras_scale(np.abs(x).max(), 1.0, float(ml_dtypes.finfo(dtype).max), margin)
        expected = keras.quantizers.quantize_and_dequantize(x, scale, dtype, "float32")
        assert np.array_equal(tfhfp8.quantize(x, fmt).numpy(), expected.numpy())
        assert np.array_equal(tfhfp8.quantize(x, fmt, scale=0.25).numpy(),
                              keras.quantizers.quantize_and_dequantize(
                                  x, tf.constant(0.25), dtype, "float32").numpy())
    # an all-zero tensor keeps the scale 1, as Keras does
    assert np.array_equal(tfhfp8.quantize(np.zeros(3, np.float32), "e4m3_current").numpy(),
                          np.zeros(3))


def test_per_tensor_format_arguments():
    with pytest.raises(ValueError, match="block_size=None"):
        tfhfp8.BlockScaled("float8_e4m3fn", None)
    # With blocks, float32 scales are per block (tests/test_recipe_scales.py).
    assert tfhfp8.BlockScaled("float8_e4m3fn", 32, scale="float32").float32_blocks
    with pytest.raises(ValueError, match="per-tensor scaling"):
        tfhfp8.BlockScaled("float8_e4m3fn", 32, amax_history=16)
    with pytest.raises(ValueError, match="margin"):
        tfhfp8.BlockScaled("float8_e4m3fn", None, scale="float32", margin=-1)
    with pytest.raises(ValueError, match="scale is for per-tensor"):
        tfhfp8.quantize([1.0], "mxfp8_e4m3", scale=2.0)
    fmt = tfhfp8.formats.get("e5m2_delayed")
    assert fmt.delayed and fmt.amax_history == 1024 and fmt.bits == 8
    assert tfhfp8.formats.get(tfhfp8.formats.serialize(
        tfhfp8.BlockScaled("float8_e4m3fn", None, scale="float32", margin=3,
                           amax_history=7))).margin == 3


def _train_steps(layer, x, target, steps, optimizer):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
            loss = tf.reduce_mean((out - target) ** 2) * 100.0
        variables = layer.trainable_variables
        grads = tape.gradient(loss, [x] + variables)
        optimizer.apply(grads[1:], variables)
        return out, grads[0], grads[1]

    return [[t.numpy() for t in step(tf.constant(x * (1 + i)))] for i in range(steps)]


def test_keras_float8_dense_reproduced_bit_for_bit():
    """`Policy("fp8_delayed")` computes what `keras.layers.Dense` computes after
    `layer.quantize("float8")`: outputs, input and kernel gradients, weights after SGD,
    scales and amax histories, step after step.

    Named differences: (1) Keras rounds the bias to bfloat16 in the forward pass under
    float32 compute (so its bias gradient is rounded to bfloat16 too); tfhfp8 adds the
    bias in FP32 (checked below). (2) Keras updates scales and histories when its
    optimizer applies them (they are trainable variables overwritten with their
    "gradient"); tfhfp8 updates them in every pass that records gradients.
    """
    x = RNG.randn(16, 12).astype(np.float32)
    target = RNG.randn(16, 8).astype(np.float32)
    theirs = keras.layers.Dense(8, use_bias=False)
    theirs.build((None, 12))
    ours = tfhfp8.layers.Dense(8, use_bias=False, policy="fp8_delayed")
    ours.build((None, 12))
    ours.kernel.assign(theirs.kernel)
    theirs.quantize("float8")
    a = _train_steps(theirs, x, target, 4, keras.optimizers.SGD(0.1))
    b = _train_steps(ours, x, target, 4, keras.optimizers.SGD(0.1))
    for step_a, step_b in zip(a, b):
        for t_a, t_b in zip(step_a, step_b):
            assert np.array_equal(t_a, t_b)
    assert np.array_equal(theirs._kernel.numpy(), ours.kernel.numpy())
    for prefix, role in [("inputs", "activations"), ("kernel", "weights"),
                         ("outputs_grad", "errors")]:
        state = ours.scaling_state[("gemm", role, 0)]
        assert np.array_equal(getattr(theirs, f"{prefix}_scale").numpy(),
                              state["scale"].numpy())
        assert np.array_equal(getattr(theirs, f"{prefix}_amax_history").numpy(),
                              state["amax_history"].numpy())
    assert ours.scaling_state[("gemm", "errors", 0)]["scale"].numpy() != 1.0

    # (1) the bias: Keras' bias gradient is ours rounded to bfloat16.
    theirs = keras.layers.Dense(8, bias_initializer="ones")
    theirs.build((None, 12))
    ours = tfhfp8.layers.Dense(8, bias_initializer="ones", policy="fp8_delayed")
    ours.build((None, 12))
    ours.kernel.assign(theirs.kernel)
    ours.bias.assign(theirs.bias)
    theirs.quantize("float8")
    grads = []
    for layer in (theirs, ours):
        @tf.function  # Keras' float8 layer differentiates only inside a tf.function
        def bias_gradient():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, training=True) * target)
            return tape.gradient(loss, layer.bias)
        grads.append(bias_gradient().numpy())
    assert np.array_equal(grads[0], grads[1].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_delayed_scaling_state_is_saved_checkpointed_and_resumed(tmp_path):
    def model():
        keras.utils.set_random_seed(3)
        return keras.Sequential([keras.Input((6,)),
                                 tfhfp8.layers.Dense(8, activation="relu", policy="fp8_delayed"),
                                 tfhfp8.layers.Dense(3, policy="fp8_delayed")])
    x = RNG.randn(32, 6).astype(np.float32)
    y = RNG.randint(0, 3, 32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    m = model()
    m.compile(keras.optimizers.SGD(0.05), loss)
    m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    m.save(path)
    ckpt = tf.train.Checkpoint(model=m)
    saved = ckpt.write(os.path.join(tmp_path, "ckpt"))
    state = m.layers[0].scaling_state[("gemm", "errors", 0)]
    before = state["amax_history"].numpy().copy()
    assert np.count_nonzero(before) == 4  # one amax per step

    loaded = keras.saving.load_model(path)
    loaded_state = loaded.layers[0].scaling_state[("gemm", "errors", 0)]
    assert np.array_equal(loaded_state["amax_history"].numpy(), before)
    assert np.array_equal(loaded_state["scale"].numpy(), state["scale"].numpy())
    m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(m.weights, loaded.weights):
        assert np.array_equal(a.numpy(), b.numpy()), a.path
    # a checkpoint restores the state too
    ckpt.read(saved).assert_existing_objects_matched()
    assert np.array_equal(state["amax_history"].numpy(), before)


# -- presets ----------------------------------------------------------------------------
def test_block_presets_follow_their_recipes():
    mx8 = tfhfp8.Policy("mxfp8")
    assert (mx8.weights.name, mx8.activations.name, mx8.errors.name) == (
        "mxfp8_e4m3", "mxfp8_e4m3", "mxfp8_e5m2")
    assert mx8.weight_gradients is None and not mx8.exempt_first_last
    assert tfhfp8.Policy("mxfp4").weights.name == "mxfp4_e2m1"
    nv = tfhfp8.Policy("nvfp4")
    assert nv.rounding["errors"] == "stochastic" and nv.rounding["weights"] == "nearest_even"
    assert nv.exempt_first_last and nv.exempt_format.name == "bfloat16"
    assert not nv.quantize_attention and not nv.for_exempt_layer().quantize_attention
    assert tfhfp8.policy.get(tfhfp8.policy.serialize(nv)) == nv
    assert tfhfp8.Policy("nvfp4", exempt_format="float16").exempt_format.name == "float16"


def test_block_presets_train_a_small_transformer_block():
    x = RNG.randint(0, 50, (8, 12))
    y = RNG.randint(0, 2, 8)
    # mxfp8: every GEMM of the block quantized; nvfp4: exempt layers, FP32 attention
    # products, stochastic errors (mxfp6 and mxfp4 differ from mxfp8 by formats only).
    for name in ("mxfp8", "nvfp4"):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((12,), dtype="int32")
        h = keras.layers.Embedding(50, 16)(inputs)
        h = keras.layers.MultiHeadAttention(2, 8)(h, h)
        h = keras.layers.Conv1D(16, 3, padding="same")(h)
        h = keras.layers.GlobalAveragePooling1D()(h)
        model = tfhfp8.quantize_model(keras.Model(inputs, keras.layers.Dense(2)(h)), name)
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, epochs=1, verbose=0)
        assert np.all(np.isfinite(history.history["loss"])), name
