"""tfhfp8.export: ONNX (QuantizeLinear / DequantizeLinear, run in ONNX Runtime) and a
SavedModel that serves without tfhfp8.

Exactness against independent references (ml_dtypes, tests/reference.py's fractions
DFP, gfloat for MX): a Dense layer whose kernel (or input) is the identity passes the
other operand's quantized values through exactly, so the ONNX Runtime output is the
exported QDQ's, bit for bit. Real-data models: predictions agree with the Keras model
on every test example, logits within LOGIT_BOUND.
"""

import os
import subprocess
import sys

import keras
import ml_dtypes
import numpy as np
import pytest

import tfhfp8
from tfhfp8 import datasets, fine_tuning, pretrained

onnx = pytest.importorskip("onnx", reason="the export extra: pip install 'tfhfp8[export]'")
ort = pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime)")
pytest.importorskip("tf2onnx", reason="the export extra (tf2onnx)")
pytest.importorskip("gfloat")
import gfloat.formats  # noqa: E402 (binds gfloat too)

import reference  # noqa: E402 (tests/reference.py, an independent fractions DFP)

# Predictions agree everywhere; logits differ by FP32 summation order (<= 1e-5 with
# the float32 policy) and, in quantized models, by a sum landing within an FP32 ulp of
# a rounding boundary and rounding to the neighbouring 8-bit value downstream.
LOGIT_BOUND = 1e-2


def run_onnx(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if not isinstance(inputs, dict):
        inputs = {session.get_inputs()[0].name: inputs}
    return session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})[0]


def initializer_types(path):
    model = onnx.load(str(path))
    return {init.name: init.data_type for init in model.graph.initializer}


# -- exactness ------------------------------------------------------------------------
def _probe_values(limit, seed=0):
    """Finite values of every binade around [2^-20, limit], ties of 8-bit formats
    included, and random normals."""
    rng = np.random.default_rng(seed)
    codes = np.arange(256, dtype=np.uint8)
    grids = [codes.view(t).astype(np.float32) for t in (
        ml_dtypes.float8_e4m3b11fnuz, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn)]
    grid = np.unique(np.concatenate([g[np.isfinite(g)] for g in grids]))
    mids = ((grid[1:].astype(np.float64) + grid[:-1]) / 2).astype(np.float32)
    x = np.concatenate([grid, mids, np.nextafter(mids, np.float32(np.inf)),
                        np.nextafter(mids, np.float32(-np.inf)),
                        rng.standard_normal(4096).astype(np.float32) * 3,
                        np.float32([0.0, -0.0, limit * 1.5, -limit * 4])])
    return x


def _identity_model(policy, n):
    layer = tfhfp8.layers.Dense(n, use_bias=False, policy=policy)
    model = keras.Sequential([keras.Input((n,)), layer])
    layer.kernel.assign(np.eye(n, dtype=np.float32))
    return model


def _float_reference(dtype, limit):
    def rounded(x):  # saturating, as the policies do; fnuz/-0: +0 in a sum anyway
        return np.clip(x, -limit, limit).astype(dtype).astype(np.float32) + np.float32(0)
    return rounded


def _dfp_reference(x):
    return reference.dfp_reference(x, bits=16, saturate=True)[0].astype(np.float32) + 0


def _mx_reference(x, block=32):
    out = np.empty_like(x)
    for row in range(x.shape[0]):
        for start in range(0, x.shape[1], block):
            out[row, start:start + block] = gfloat.quantize_block(
                gfloat.formats.format_info_mxfp8_e4m3,
                x[row, start:start + block].astype(np.float64), gfloat.compute_scale_amax,
                gfloat.RoundMode.TiesToEven)
    return out + np.float32(0)


FORMATS = {
    # policy format, the ONNX type of its stored weights, independent reference, limit
    "float8_e4m3b11fnuz": (onnx.TensorProto.FLOAT8E4M3FNUZ,
                           _float_reference(ml_dtypes.float8_e4m3b11fnuz, 30.0), 30.0),
    # IEEE P3109's signed finite 1-4-3 is FLOAT8E4M3FNUZ exactly.
    "p3109_k8p4sf": (onnx.TensorProto.FLOAT8E4M3FNUZ,
                     _float_reference(ml_dtypes.float8_e4m3fnuz, 240.0), 240.0),
    "float8_e5m2": (onnx.TensorProto.FLOAT8E5M2,
                    _float_reference(ml_dtypes.float8_e5m2, 57344.0), 57344.0),
    "float16": (onnx.TensorProto.FLOAT16, _float_reference(np.float16, 65504.0), 65504.0),
    "bfloat16": (onnx.TensorProto.BFLOAT16,
                 _float_reference(ml_dtypes.bfloat16, float(ml_dtypes.finfo(
                     ml_dtypes.bfloat16).max)), 1e30),
    "int16_dfp": (onnx.TensorProto.INT16, _dfp_reference, 1e4),
    "mxfp8_e4m3": (onnx.TensorProto.FLOAT8E4M3FN, _mx_reference, 1e4),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_activations_round_bit_for_bit(fmt, tmp_path):
    """ONNX Runtime's QDQ of the inputs == the independent reference, every bit."""
    _, rounded, limit = FORMATS[fmt]
    x = _probe_values(limit)
    x = x[: len(x) // 64 * 64].reshape(-1, 64)
    policy = tfhfp8.Policy(weights=fmt, activations=fmt)
    path = tfhfp8.export(_identity_model(policy, 64), tmp_path / "m.onnx")
    got = run_onnx(path, x)
    np.testing.assert_array_equal(got.view(np.uint32), rounded(x).view(np.uint32))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_weights_are_stored_quantized_bit_for_bit(fmt, tmp_path):
    """The kernel is stored in the format's ONNX type; through an identity input it
    comes back as the reference's rounding of the FP32 kernel (MX: blocks along the
    reduction axis, the kernel's first)."""
    onnx_type, rounded, _ = FORMATS[fmt]
    w = (np.random.default_rng(1).standard_normal((64, 48)) * 2).astype(np.float32)
    layer = tfhfp8.layers.Dense(48, use_bias=False, policy=tfhfp8.Policy(weights=fmt))
    model = keras.Sequential([keras.Input((64,)), layer])
    layer.kernel.assign(w)
    path = tfhfp8.export(model, tmp_path / "m.onnx")
    got = run_onnx(path, np.eye(64, dtype=np.float32))
    expected = rounded(w.T).T if fmt == "mxfp8_e4m3" else rounded(w)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert onnx_type in initializer_types(path).values()
    assert onnx.TensorProto.FLOAT not in [t for name, t in initializer_types(path).items()
                                          if "weight_codes" in name]


def test_hfp8_is_float8e4m3fnuz_times_2_to_the_minus_3():
    """Every code of HFP8's 1-4-3 (bias 11) decodes in ONNX Runtime, as FLOAT8E4M3FNUZ
    with scale 2^-3, to ml_dtypes' float8_e4m3b11fnuz value, bit for bit."""
    from onnx import helper, numpy_helper

    from tfhfp8.export import onnx_formats

    plan = onnx_formats.plan(tfhfp8.formats.get("hfp8_fwd"))
    assert plan.onnx_type == onnx.TensorProto.FLOAT8E4M3FNUZ and plan.scale == 2.0 ** -3
    codes = np.arange(256, dtype=np.uint8)
    stored = numpy_helper.from_array(codes.view(ml_dtypes.float8_e4m3fnuz), "codes")
    scale = numpy_helper.from_array(np.float32(plan.scale), "scale")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["codes", "scale"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [256])],
        initializer=[stored, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    got = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {})[0]
    expected = codes.view(ml_dtypes.float8_e4m3b11fnuz).astype(np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))


# -- real data ------------------------------------------------------------------------
def _fit(model, x, y, epochs=1):
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return model


def _bert_inputs(ids):
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids),
            "padding_mask": (ids != 0).astype("int32")}


@pytest.fixture(scope="module")
def trained():
    """Four small models trained briefly in FP32 on real data, with test inputs."""
    keras.utils.set_random_seed(0)
    (x, y), (xt, _) = datasets.load("fashion_mnist", limit=512, test_limit=300)[:2]
    cnn = _fit(tfhfp8.models.small_cnn(filters=(8, 16), dense_units=32,
                                       classifier_activation=None), x, y)
    (x, y), (xt_digits, _) = datasets.load("digits")[:2]
    mobile = _fit(tfhfp8.models.mobilenet_v2(
        input_shape=(8, 8, 1), width=0.5, blocks=((1, 16, 1, 1), (6, 24, 2, 2)),
        last_channels=64, classifier_activation=None), x, y, epochs=3)
    (x, y), (xt_text, _) = datasets.rotten_tomatoes(sequence_length=24, vocab_size=1000)[:2]
    x, y, xt_text = x[:512], y[:512], xt_text[:300]
    transformer = _fit(tfhfp8.models.transformer_classifier(
        1000, 24, embed_dim=32, num_heads=2, ff_dim=64, num_layers=1,
        classifier_activation=None), x, y)
    # A CI-sized stand-in for colab/05's MiniLM: a KerasHub BERT backbone rebuilt from
    # plain layers by tfhfp8.finetune's own code, with its classification head.
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=1000, num_layers=1, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=24)
    bert = _fit(pretrained.text_classifier(
        fine_tuning.unroll_transformer_encoder(backbone), 2), _bert_inputs(x), y)
    return {"small_cnn": (cnn, xt), "mobilenet": (mobile, xt_digits),
            "transformer": (transformer, xt_text), "bert": (bert, _bert_inputs(xt_text))}


# Every model in hfp8, every policy on the CNN, MX attention on both Transformers: the
# rest of the model x policy table (and the pretrained MiniLM) is `python -m
# models.export` (docs/deployment.md), whose exports take minutes on this CPU.
CASES = ([(name, "hfp8") for name in ("small_cnn", "mobilenet", "transformer", "bert")]
         + [("small_cnn", policy) for policy in ("fp8", "int16_dfp", "mxfp8")]
         + [("transformer", "mxfp8"), ("bert", "int16_dfp")])


@pytest.mark.parametrize("name, policy", CASES)
def test_onnx_runtime_agrees_on_real_data(trained, name, policy, tmp_path):
    fp32, x = trained[name]
    model = tfhfp8.quantize_model(fp32, policy)
    expected = model.predict(x, batch_size=256, verbose=0)
    path = tfhfp8.export(model, tmp_path / "model.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    got = run_onnx(path, x)
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
    assert np.abs(got - expected).max() <= LOGIT_BOUND * max(1.0, np.abs(expected).max())
    # Every kernel of a quantized layer is stored as codes, none as FP32.
    assert stored_code_elements(path) == quantized_kernel_elements(model)


def quantized_kernel_elements(model):
    """Elements of the kernels (and embedding tables) of the emulated layers that
    quantize weights (attention: its projections, walked as sublayers)."""
    kernels = ("kernel", "embeddings", "depthwise_kernel", "pointwise_kernel")
    return sum(int(np.prod(v.shape))
               for layer in tfhfp8.layers.walk(model, sublayers=True, any_model=True)
               if isinstance(layer, tfhfp8.layers.EmulatedLayer)
               and not isinstance(layer, keras.layers.MultiHeadAttention)
               and layer.policy.weights is not None
               for v in layer.weights if v.path.split("/")[-1] in kernels)


def stored_code_elements(path):
    return sum(int(np.prod(init.dims)) for init in onnx.load(str(path)).graph.initializer
               if init.name.endswith(("weight_codes", "weight_float16")))


def test_saved_model_serves_without_tfhfp8(trained, tmp_path):
    """Loaded and run in `python -I` from another folder, tfhfp8 unimportable and its
    C++ ops unregistered: the outputs equal the Keras model's bit for bit."""
    fp32, x = trained["small_cnn"]
    model = tfhfp8.quantize_model(fp32, "hfp8")
    expected = model(x, training=False).numpy()  # one batch, as served below
    path = tfhfp8.export(model, tmp_path / "served", format="saved_model")
    np.save(tmp_path / "x.npy", x)
    script = (
        "import os, sys; sys.modules['tfhfp8'] = None\n"  # any import of tfhfp8 fails
        "import numpy as np, tensorflow as tf\n"
        f"served = tf.saved_model.load({str(path)!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "y = served.serve(tf.constant(x)).numpy()\n"
        "assert not any(os.path.isdir(os.path.join(p, 'tfhfp8')) for p in sys.path), sys.path\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, check=True,
                   timeout=300)
    got = np.load(tmp_path / "y.npy")
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


# -- bad input ------------------------------------------------------------------------
def _dense_model(policy, n=8):
    return keras.Sequential([keras.Input((n,)), tfhfp8.layers.Dense(4, policy=policy)])


def _assert_nothing_written(folder):
    assert os.listdir(folder) == [], os.listdir(folder)


@pytest.mark.parametrize("fmt, message", [
    ("float8_e3m4", "float8_e3m4 .* has no ONNX type"),
    ("mxfp6_e3m2", "element 'float6_e3m2fn' has no ONNX QuantizeLinear type"),
    ("nvfp4", "only E8M0 block scales"),
    ("e4m3_delayed", "per-tensor FP32 scaling"),
])
def test_a_format_onnx_cannot_hold_is_refused(fmt, message, tmp_path):
    model = _dense_model(tfhfp8.Policy(weights=fmt, activations=fmt))
    with pytest.raises(ValueError, match=f"layer 'dense.*{message}"):
        tfhfp8.export(model, tmp_path / "m.onnx")
    _assert_nothing_written(tmp_path)


def test_training_only_roundings_and_sums_are_refused(tmp_path):
    stochastic = tfhfp8.Policy(weights="float8_e5m2", rounding="stochastic")
    with pytest.raises(ValueError, match="rounding='stochastic'.*nearest even"):
        tfhfp8.export(_dense_model(stochastic), tmp_path / "m.onnx")
    summing = tfhfp8.Policy("hfp8", accumulation="float16")
    with pytest.raises(ValueError, match="sums its products in float16"):
        tfhfp8.export(_dense_model(summing), tmp_path / "m.onnx")
    _assert_nothing_written(tmp_path)


def test_a_layer_the_exporter_cannot_express_is_named(tmp_path):
    class NumpyLayer(keras.layers.Layer):
        def call(self, x):
            import tensorflow as tf

            return tf.ensure_shape(tf.numpy_function(np.sin, [x], "float32"), x.shape)

        def compute_output_shape(self, shape):
            return shape

    inputs = keras.Input((4,))
    model = keras.Model(inputs, NumpyLayer(name="numpy_sine")(
        tfhfp8.layers.Dense(4, policy="int16_dfp")(inputs)))
    with pytest.raises(ValueError, match="cannot express.*PyFunc.*numpy_sine"):
        tfhfp8.export(model, tmp_path / "m.onnx")
    _assert_nothing_written(tmp_path)


def test_forced_backend_takes_a_name_or_a_backend():
    with pytest.raises(TypeError, match="backend must be 'tf', 'cpp' or an object"):
        with tfhfp8.ops.forced_backend("xla"):
            pass
    with tfhfp8.ops.forced_backend("tf"):
        assert tfhfp8.ops.active_backend().quantize_float is not None
    assert tfhfp8.ops.active_backend() is not None  # the scope is gone


def test_existing_path_needs_overwrite(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_text("precious")
    model = _dense_model("int16_dfp")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tfhfp8.export(model, path)
    assert path.read_text() == "precious"
    tfhfp8.export(model, path, overwrite=True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporary left


def test_unbuilt_model_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="'never_built' was never built"):
        tfhfp8.export(keras.Sequential([tfhfp8.layers.Dense(2)], name="never_built"),
                      tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="format must be one of"):
        tfhfp8.export(_dense_model("hfp8"), tmp_path / "m.tflite", format="tflite")
    with pytest.raises(TypeError, match="keras.Model"):
        tfhfp8.export("model.keras", tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tfhfp8.export(_dense_model("hfp8"), tmp_path / "missing" / "m.onnx")
    _assert_nothing_written(tmp_path)


# -- command line ---------------------------------------------------------------------
def _cli(*args, cwd):
    command = [sys.executable, "-c", "from tfhfp8.cli import run; run()", "export", *args]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this tfhfp8
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=env)


def test_command_line_exports_and_refuses_to_overwrite(tmp_path):
    model = _dense_model(tfhfp8.Policy("hfp8", exempt_first_last=False))
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    result = _cli("--model=m.keras", "--output=m.onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote" in result.stdout and "m.onnx" in result.stdout
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    before = (tmp_path / "m.onnx").read_bytes()
    again = _cli("--model=m.keras", "--output=m.onnx", "--format=onnx", cwd=tmp_path)
    assert again.returncode != 0
    assert "m.onnx exists; pass --overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert (tmp_path / "m.onnx").read_bytes() == before
