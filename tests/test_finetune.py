"""`tfhfp8.finetune` and `tfhfp8 finetune`: FP32 fine-tuning, PTQ, 8-bit fine-tuning.

Small real cases: a CNN with BatchNorm pretrained on real digits and fine-tuned on
them again from its saved `.keras` file (through the command line); a KerasHub BERT
encoder saved as a local preset directory, fine-tuned on a CSV of real review snippets
(Rotten Tomatoes). The pretrained MiniLM itself runs in colab/05 (tests/test_notebooks.py).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tfhfp8
from tfhfp8 import datasets, fine_tuning


def _run(*args):
    command = [sys.executable, "-c", "from tfhfp8.cli import run; run()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def pretrained_cnn(tmp_path_factory):
    """small_cnn (3 BatchNorm layers) trained one epoch on real digits, saved."""
    (x, y), _ = datasets.digits()
    keras.utils.set_random_seed(0)
    model = tfhfp8.models.small_cnn(input_shape=(8, 8, 1), num_classes=10)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x[:512], y[:512], epochs=1, batch_size=64, verbose=0)
    path = str(tmp_path_factory.mktemp("pretrained") / "cnn.keras")
    model.save(path)
    return path


def test_cli_finetune_writes_results_plot_and_a_model_that_reloads_identically(
        pretrained_cnn, tmp_path):
    before = open(pretrained_cnn, "rb").read()
    out = tmp_path / "out"
    result = _run("finetune", f"--model={pretrained_cnn}", "--dataset=digits",
                  "--policy=hfp8", "--epochs=2", "--learning_rate=3e-3", "--limit=256", "--test_limit=128",
                  "--batch_size=32", "--calibration_steps=2", "--image_size=8", "--image_scale=1",
                  f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert open(pretrained_cnn, "rb").read() == before  # the input is not touched
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert (config["train_examples"], config["test_examples"]) == (256, 128)
    assert config["batchnorm"] and config["image_shape"] == [8, 8, 1]
    assert set(results["policies"]) == {"hfp8"}
    for name, rows in results["policies"].items():
        assert set(rows) == {"ptq", "ptq_recalibrated", "finetuned"}
        for row in rows.values():
            assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["agreement_with_fp32"] <= 1.0
            assert row["loss"] > 0 and row["seconds"] > 0
        assert rows["finetuned"]["reload_identical"] is True
        assert len(rows["finetuned"]["history"]["loss"]) == 2  # epochs
        # The table printed on stdout carries the same numbers.
        assert f"{100 * rows['finetuned']['accuracy']:.2f}%" in result.stdout
    # Real learning: 16 steps with a new head, far above chance (10%).
    assert results["fp32"]["accuracy"] > 0.4
    assert results["policies"]["hfp8"]["finetuned"]["accuracy"] > 0.4
    assert (out / "finetune.png").stat().st_size > 10000

    # The saved 8-bit model: emulated layers, the same predictions after reloading.
    model_path = out / "finetuned_hfp8.keras"
    reloaded = keras.saving.load_model(model_path)
    assert any(isinstance(layer, tfhfp8.layers.EmulatedLayer)
               for layer in tfhfp8.layers.walk(reloaded))
    again = keras.saving.load_model(model_path)
    (x, _), _ = datasets.digits()
    x = x[:64]
    np.testing.assert_array_equal(np.asarray(reloaded(x, training=False)),
                                  np.asarray(again(x, training=False)))


class Block(keras.layers.Layer):
    """A custom layer hiding a Dense inside: its GEMM cannot be converted."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units)

    def call(self, x):
        return self.dense(x)


def test_unconvertible_layer_is_named_before_any_work_and_model_unchanged(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = Block(16, name="hidden_block")(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    weights = [w.copy() for w in model.get_weights()]
    (x_train, y_train), (x_test, y_test) = datasets.digits()
    with pytest.raises(ValueError, match="layer 'hidden_block' \\(Block\\) holds Dense"):
        tfhfp8.finetune(model, ((x_train[:64], y_train[:64]), (x_test[:32], y_test[:32])),
                        "hfp8", output_dir=str(tmp_path / "out"), verbose=0)
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert len(model.layers) == 4  # no head was attached to the model itself
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("arguments, error, message", [
    (dict(epochs=0), ValueError, "epochs must be a positive integer"),
    (dict(learning_rate=-1.0), ValueError, "learning_rate must be a positive"),
    (dict(policies=["hfp9"]), ValueError, "hfp9"),
    (dict(dataset="no_such_data"), ValueError, "dataset must be one of"),
    (dict(model="missing.keras"), ValueError, "model: no such file"),
])
def test_bad_arguments_are_clear_errors(arguments, error, message, pretrained_cnn):
    settings = dict(model=pretrained_cnn, dataset="digits", policies="hfp8", verbose=0)
    settings.update(arguments)
    with pytest.raises(error, match=message):
        tfhfp8.finetune(settings.pop("model"), settings.pop("dataset"),
                        settings.pop("policies"), **settings)


def test_keras_hub_encoder_from_a_preset_directory_on_a_csv_of_reviews(tmp_path):
    """A BERT encoder as a local KerasHub preset; its TransformerEncoder blocks are
    rebuilt from plain Keras layers (the same outputs) and fine-tuned in hfp8."""
    import keras_hub

    keras.utils.set_random_seed(0)
    (texts, labels), _ = datasets.rotten_tomatoes_texts()
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {word for text in texts[:400] for word in datasets.tokenize(text)})[:300]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary), num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=32)
    preset = tmp_path / "tiny_bert"
    backbone.save_to_preset(str(preset))
    tokenizer.save_to_preset(str(preset))

    # The rebuilt encoder computes what KerasHub's does (exact vs tanh GELU aside).
    unrolled = fine_tuning.unroll_transformer_encoder(backbone)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer,
                                                                   sequence_length=12)
    inputs = {k: np.asarray(v).astype("int32") for k, v in preprocessor(texts[:4]).items()}
    assert inputs["padding_mask"].sum() > 8  # real tokens
    np.testing.assert_allclose(np.asarray(unrolled(inputs)),
                               np.asarray(backbone(inputs)["sequence_output"]), atol=2e-3)
    assert not any(type(layer).__name__ == "TransformerEncoder" for layer in unrolled.layers)

    csv = tmp_path / "reviews.csv"
    with open(csv, "w", newline="") as f:
        import csv as csv_lib

        writer = csv_lib.writer(f)
        writer.writerow(["text", "label"])
        for text, label in zip(texts[:80], labels[:80]):
            writer.writerow([text, "fresh" if label else "rotten"])
    result = tfhfp8.finetune(str(preset), str(csv), "hfp8", epochs=1, batch_size=16,
                             sequence_length=16, output_dir=str(tmp_path / "out"), verbose=0)
    assert result["config"]["kind"] == "text"
    assert (result["config"]["train_examples"], result["config"]["test_examples"]) == (64, 16)
    assert set(result["policies"]["hfp8"]) == {"ptq", "finetuned"}  # no BatchNorm
    assert result["policies"]["hfp8"]["finetuned"]["reload_identical"] is True
    model = keras.saving.load_model(tmp_path / "out" / "finetuned_hfp8.keras")
    emulated = [type(layer).__name__ for layer in tfhfp8.layers.walk(model, sublayers=True)
                if isinstance(layer, tfhfp8.layers.EmulatedLayer)]
    # Every GEMM of the encoder is emulated: embeddings, attention, feed-forward, head.
    assert emulated.count("MultiHeadAttention") == 2
    assert emulated.count("Dense") == 2 * 2 + 1
    assert "Embedding" in emulated


def test_rotten_tomatoes_loads_as_labelled_texts():
    data = fine_tuning.load_data("rotten_tomatoes", limit=20, test_limit=10)
    assert data["kind"] == "text" and data["classes"] == ["rotten", "fresh"]
    assert len(data["train"][0]) == 20 and all(isinstance(t, str) for t in data["train"][0])
