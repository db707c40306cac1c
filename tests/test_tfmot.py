"""tfhfp8.tfmot, the tensorflow-model-optimization bridge.

tfmot needs tf-keras with TF_USE_LEGACY_KERAS=1, which changes tf.keras for a whole
process: the models are built, compared and trained in one subprocess
(tests/tfmot_check.py); this process (Keras 3) checks that tfhfp8 leaves tf.keras alone
and that the bridge says what to do when it cannot run. The extra (`pip install
"tfhfp8[tfmot]"`) is installed by `make test` and `make test-oldest`: a missing extra is a
failure here, not a skip.
"""

import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A hung subprocess fails the test instead of hanging the run (generous: about 30 s on
# an idle 2-core machine, several minutes on a loaded one, plus a first C++ build).
CHECK_SECONDS = 900


def _run_check():
    for module in ("tensorflow_model_optimization", "tf_keras"):
        assert importlib.util.find_spec(module) is not None, (
            f"{module} is missing: install the extra, pip install -e '.[tfmot]'")
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [
                   os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "tfmot_check.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=CHECK_SECONDS)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# One test for everything the subprocess finds: under pytest-xdist, tests sharing a
# module fixture may run on different workers, each starting the subprocess again.
def test_bridge_in_a_tf_keras_process():
    facts = _run_check()
    failures = []

    def check(condition, what):
        if not condition:
            failures.append(what)

    # Outputs, gradients (inputs, kernels, biases) and the weights after one SGD step
    # with master-weight rounding: the same bits as tfhfp8's Keras 3 layers, for a Dense
    # and a Conv2D model under hfp8 (first and last GEMM exempt) and fp8 (nearest).
    for model in ("dense", "conv", "conv_fp8"):
        result = facts[model]
        check(result["outputs_differ_from_fp32"], f"{model}: the formats change nothing")
        check(result["outputs_equal"], f"{model}: outputs differ")
        check(result["gradient_keys_equal"] and len(result["gradient_keys"]) == 9,
              f"{model}: gradients of {result['gradient_keys']}")
        check(all(result["gradients_equal"].values()),
              f"{model}: gradients {result['gradients_equal']}")
        check(all(result["weights_after_step_equal"].values()),
              f"{model}: weights after a step {result['weights_after_step_equal']}")
        check(result["outputs_after_step_equal"], f"{model}: outputs after a step differ")

    # The tfmot guide's example (quantize_apply with Scheme("hfp8"), 5 epochs of real
    # digits): Q_a before each GEMM; every weight moved and stayed finite; the master
    # weights of the two GEMM layers hfp8 does not exempt are float16 values; it
    # learned; it predicts the same after saving and reloading.
    guide = facts["guide"]
    check(guide["quantize_layers"] == 4, f"guide: {guide['quantize_layers']} QuantizeLayers")
    check(guide["same_variables"], "guide: the quantized model has other variables")
    check(guide["finite"], "guide: non-finite weights")
    check(len(guide["changed"]) == 8 and all(guide["changed"].values()),
          f"guide: weights changed {guide['changed']}")
    check(guide["kernels_float16"] == [False, True, True, False],
          f"guide: float16 kernels {guide['kernels_float16']}")
    check(guide["accuracy"] > 0.8, f"guide: accuracy {guide['accuracy']}")
    check(guide["reloaded_h5_equal"], "guide: the reloaded .h5 model predicts otherwise")

    # What the bridge does not support is named, with what to do instead.
    errors = facts["errors"]
    check("LossScaleOptimizer" in errors.get("loss_scaling", ""), errors)
    check("accumulation=None" in errors.get("accumulation", ""), errors)
    check("'lstm' is a LSTM" in errors.get("unsupported_layer", ""), errors)
    assert not failures, "\n".join(map(str, failures))


def _import_bridge():
    sys.modules.pop("tfhfp8.tfmot", None)
    return importlib.import_module("tfhfp8.tfmot")


def test_import_tfhfp8_leaves_tf_keras_alone():
    import keras
    import tfhfp8  # noqa: F401

    assert "tensorflow_model_optimization" not in sys.modules
    assert "tfhfp8.tfmot" not in sys.modules
    assert tf.keras.layers.Layer is keras.layers.Layer  # still Keras 3


def test_clear_errors(monkeypatch):
    tf.keras.layers.Layer  # noqa: B018 (tf.keras resolved now: Keras 3 in this process)
    monkeypatch.delenv("TF_USE_LEGACY_KERAS", raising=False)
    with pytest.raises(ImportError, match=r"TF_USE_LEGACY_KERAS is not set.*pip install"):
        _import_bridge()
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "1")
    with pytest.raises(ImportError, match=r"tf.keras is Keras 3 in this process"):
        _import_bridge()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if (
        name == "tensorflow_model_optimization") else find_spec(name, *args))
    with pytest.raises(ImportError, match=r"tensorflow_model_optimization is not installed"
                                          r".*tfhfp8\[tfmot\]"):
        _import_bridge()
    assert "tensorflow_model_optimization" not in sys.modules
    assert "tfhfp8.tfmot" not in sys.modules
