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
CHECK_SECONDS = 300  # a hung subprocess fails the test instead of the whole run


@pytest.fixture(scope="module")
def facts():
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


@pytest.mark.parametrize("model", ["dense", "conv", "conv_fp8"])
def test_bit_identical_to_keras3_layers(facts, model):
    """Outputs, gradients (inputs, kernels, biases) and the weights after one SGD step
    with master-weight rounding: the same bits as tfhfp8's Keras 3 layers."""
    result = facts[model]
    assert result["outputs_differ_from_fp32"]  # the formats do something
    assert result["outputs_equal"]
    assert result["gradient_keys_equal"]
    assert len(result["gradients_equal"]) == len(result["gradient_keys"]) == 9
    assert all(result["gradients_equal"].values()), result["gradients_equal"]
    assert all(result["weights_after_step_equal"].values()), result["weights_after_step_equal"]
    assert result["outputs_after_step_equal"]


def test_readme_example_trains(facts):
    """The README's example (quantize_apply with Scheme("hfp8"), 5 epochs of real
    digits): every weight moved and stayed finite, the master weights of the two GEMM
    layers that hfp8 does not exempt are float16 values, and it learned."""
    result = facts["readme"]
    assert result["quantize_layers"] == 4  # Q_a before each annotated GEMM layer
    assert result["same_variables"]
    assert result["finite"]
    assert len(result["changed"]) == 8 and all(result["changed"].values()), result["changed"]
    assert result["kernels_float16"] == [False, True, True, False]
    assert result["accuracy"] > 0.8, result


def test_unsupported_requests_are_named(facts):
    assert "loss_scaling" in facts["errors"]["loss_scaling"]
    assert "LossScaleOptimizer" in facts["errors"]["loss_scaling"]
    assert "'lstm' is a LSTM" in facts["errors"]["unsupported_layer"]


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
