"""Run by tests/test_tfmot.py in its own process with TF_USE_LEGACY_KERAS=1 (tfmot needs
tf-keras, which then is tf.keras for the whole process): the same models built in tf-keras
(quantized by tfmot with tfhfp8.tfmot.Scheme) and in Keras 3 (tfhfp8.quantize_model) on the
same weights and inputs. Prints one JSON object of facts; the test asserts on them."""

import contextlib
import io
import json
import os
import pathlib
import re
import sys
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import keras  # Keras 3: tfhfp8's own layers, the reference
import tfhfp8
import tfhfp8.tfmot

tk = tf.keras  # tf-keras here
annotate = tfmot.quantization.keras.quantize_annotate_layer


def dense_layers(lib):
    return [lib.layers.Dense(24, activation="relu", name="d1"),
            lib.layers.Dense(16, activation="tanh", name="d2"),
            lib.layers.Dense(12, activation="relu", name="d3"),
            lib.layers.Dense(5, name="d4")]


def conv_layers(lib):
    return [lib.layers.Conv2D(6, 3, activation="relu", name="c1"),
            lib.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2"),
            lib.layers.Conv2D(8, 3, strides=2, name="c3"),
            lib.layers.Flatten(name="flat"),
            lib.layers.Dense(5, name="d")]


def build(lib, layers, shape, annotated):
    gemm = (lib.layers.Dense, lib.layers.Conv2D)
    return lib.Sequential([lib.Input(shape)] + [
        annotate(layer) if annotated and isinstance(layer, gemm) else layer
        for layer in layers])


def key(variable):
    """`layer/weight` for a Keras 3 or tf-keras variable."""
    name = getattr(variable, "path", None) or variable.name.split(":")[0]
    return "/".join(name.split("/")[-2:])


def bits_equal(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def compare(name, make_layers, shape, policy):
    rng = np.random.RandomState(0)
    tk.utils.set_random_seed(0)
    plain = build(tk, make_layers(tk), shape, annotated=True)
    qat = tfmot.quantization.keras.quantize_apply(
        plain, scheme=tfhfp8.tfmot.Scheme(policy))
    reference = build(keras, make_layers(keras), shape, annotated=False)
    # The Keras 3 model gets the tf-keras model's initial weights, layer by layer.
    source = {getattr(layer, "layer", layer).name: getattr(layer, "layer", layer)
              for layer in plain.layers}
    for layer in reference.layers:
        layer.set_weights(source[layer.name].get_weights())
    emulated = tfhfp8.quantize_model(reference, policy)
    x = rng.randn(8, *shape).astype("float32") * 2.0
    r = rng.randn(8, 5).astype("float32")
    results = {}

    def step(model, variables):
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = model(xt, training=True)
            loss = tf.reduce_sum(y * r)
        grads = tape.gradient(loss, [xt] + variables)
        return y.numpy(), {k: g.numpy() for k, g in zip(["x"] + [key(v) for v in variables],
                                                         grads)}

    qat_vars = [v for v in qat.trainable_variables]
    ref_vars = [v for v in emulated.trainable_variables]
    y_qat, g_qat = step(qat, qat_vars)
    y_ref, g_ref = step(emulated, ref_vars)
    results["outputs_equal"] = bits_equal(y_qat, y_ref)
    results["outputs_differ_from_fp32"] = not bits_equal(y_ref, reference(x).numpy())
    results["gradient_keys"] = sorted(g_ref)
    results["gradient_keys_equal"] = sorted(g_qat) == sorted(g_ref)
    results["gradients_equal"] = {k: bits_equal(g_qat[k], g_ref[k]) for k in g_ref
                                  if k in g_qat}
    results["max_abs_output"] = float(np.abs(y_ref).max())
    # One SGD step in both (master weights rounded to the policy's format after it).
    tk_opt, k3_opt = tk.optimizers.SGD(0.5), keras.optimizers.SGD(0.5)
    tk_opt.apply_gradients(zip([tf.constant(g_qat[key(v)]) for v in qat_vars], qat_vars))
    k3_opt.apply_gradients(zip([tf.constant(g_ref[key(v)]) for v in ref_vars], ref_vars))
    after_qat = {key(v): v.numpy() for v in qat_vars}
    results["weights_after_step_equal"] = {key(v): bits_equal(after_qat[key(v)], v.numpy())
                                           for v in ref_vars}
    y2_qat, _ = step(qat, qat_vars)
    y2_ref, _ = step(emulated, ref_vars)
    results["outputs_after_step_equal"] = bits_equal(y2_qat, y2_ref)
    return results


def guide_example():
    """The tfmot guide's example (docs/tfmot.md), as written; then what its training did."""
    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "tfmot.md"
    code = re.search(r"```python\n(.*?)```", page.read_text(), re.S).group(1)
    scope = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, str(page), "exec"), scope)
    loss, accuracy = eval(printed.getvalue().strip().splitlines()[-1])
    # quantize_apply copies the weights in order (the names differ: the annotated model
    # names them after its QuantizeAnnotate wrappers).
    before = [v.numpy() for v in scope["model"].trainable_variables]
    after = {v.name: v.numpy() for v in scope["qat"].trainable_variables}
    kernels = [after[name] for name in after if name.endswith("kernel:0")]
    # Saved as HDF5 and reloaded (tfmot's models, its default scheme's too, do not reload
    # from tf-keras' .keras format), the model predicts the same bits.
    path = os.path.join(tempfile.mkdtemp(), "qat.h5")
    scope["qat"].save(path)
    with tfhfp8.tfmot.quantize_scope():
        reloaded = tk.models.load_model(path)
    x_test = scope["x_test"]
    return {"loss": loss, "accuracy": accuracy,
            "reloaded_h5_equal": bits_equal(reloaded.predict(x_test, verbose=0),
                                            scope["qat"].predict(x_test, verbose=0)),
            "same_variables": [b.shape for b in before] == [a.shape for a in after.values()],
            "changed": {k: bool(np.any(b != a)) for b, (k, a) in zip(before, after.items())},
            "finite": all(bool(np.all(np.isfinite(v))) for v in after.values()),
            "quantize_layers": sum(type(layer).__name__ == "QuantizeLayer"
                                   for layer in scope["qat"].layers),
            # hfp8 rounds the master weights of the GEMMs it does not exempt (the first
            # and last) to float16 after every step
            "kernels_float16": [bits_equal(k, k.astype(np.float16).astype(np.float32))
                                for k in kernels]}


def errors():
    out = {}
    try:
        tfhfp8.tfmot.Scheme(tfhfp8.Policy("hfp8", loss_scaling="adaptive"))
    except ValueError as error:
        out["loss_scaling"] = str(error)
    try:
        tfhfp8.tfmot.QuantizeConfig(tfhfp8.Policy("hfp8", accumulation="float16"))
    except ValueError as error:
        out["accumulation"] = str(error)
    try:
        tfhfp8.tfmot.QuantizeConfig("hfp8").get_weights_and_quantizers(
            tk.layers.LSTM(3, name="lstm"))
    except ValueError as error:
        out["unsupported_layer"] = str(error)
    return out


if __name__ == "__main__":
    facts = {"tf_keras": tk.__name__,
             # Round to nearest: stochastic rounding (hfp8's errors and master weights)
             # draws from TF's random state through tfmot, from the layers' seeds here.
             "dense": compare("dense", dense_layers, (10,),
                              tfhfp8.Policy("hfp8", rounding="nearest_even")),
             "conv": compare("conv", conv_layers, (9, 9, 2),
                             tfhfp8.Policy("hfp8", rounding="nearest_even")),
             "conv_fp8": compare("conv", conv_layers, (9, 9, 2),
                                 tfhfp8.Policy("fp8", rounding="nearest_even")),
             "guide": guide_example(),
             "errors": errors()}
    json.dump(facts, sys.stdout)
