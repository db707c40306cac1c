"""Which parts of the HFP8 training recipe matter? One change at a time, same initial weights.

    python -m models.policy_comparison.hfp8_ablation --output_dir=results/hfp8_ablation \\
        --limit=10000 --test_limit=10000 --epochs=8 --learning_rate_schedule=cosine --seeds=0

Trains ResNet-20 on Fashion-MNIST (the full data set unless --limit/--test_limit) once
per variant and seed. Every variant of one seed starts from the same initial weights and
sees the data in the same order (`tfhfp8.experiment.train_policies`, Adam 1e-3). The
variants (`--variants`, default all of `DEFAULT`) spell their formats out, so that they
stay what they were when the `hfp8` preset changes:

- `float32`: no emulation.
- `hfp8`: the recipe as first shipped: 1-4-3 (bias 11) weights and activations, 1-5-2
  errors, FP16 weight gradients and master weights, all round-to-nearest, first and
  last GEMM layers in FP16, no loss scaling.
- `hfp8_adaptive`: plus per-layer adaptive loss scaling (Zhao et al., backward fan-in):
  what `tfhfp8 train` ran for `hfp8` before the preset took stochastic rounding.
- `hfp8_dynamic`: `hfp8` plus Keras' global dynamic loss scaling instead.
- `hfp8_adaptive_sr_errors`, `hfp8_adaptive_sr_master`: `hfp8_adaptive` with stochastic
  rounding of the errors, or of the master-weight update.
- `hfp8_adaptive_fp16_states`: `hfp8_adaptive` with Adam's moments in FP16 and every
  weight (BatchNorm's and the exempt layers' too) stored in FP16
  (`tfhfp8.optimizers.LowPrecisionOptimizer`): pure 16-bit weight update.
- `hfp8_adaptive_sr<r>_errors` (r = 2, 4, 8, 16; not in the default set):
  `hfp8_adaptive_sr_errors` with r random bits per stochastic rounding.
- `hfp8_sources`: loss scaling plus stochastic rounding of the errors and of the
  master-weight update (Rodriguez's summary of Sun et al.; Wang et al.'s SR update):
  the `hfp8` preset as `tfhfp8 train` runs it (adaptive loss scaling by default).

Results go to OUTPUT_DIR/seed<N>/<variant>/results.json (a run whose file exists is
skipped) and, all together, OUTPUT_DIR/ablation.json; the table of mean and standard
deviation over the seeds found is printed.

With --range_check it instead trains ResNet-20 in FP32 for one epoch on 10,000 images
and prints, for the input and the kernel of every GEMM layer, how much of it falls
outside the range of 1-4-3 bias 11 (max 30, smallest subnormal 2^-13).
"""

import json
import os

import keras
import numpy as np
from absl import app, flags

from tfhfp8 import Policy, datasets, experiment, formats, models

_FORWARD = dict(weights="float8_e4m3b11fnuz", activations="float8_e4m3b11fnuz",
                exempt_first_last=True)
_HFP8 = dict(_FORWARD, errors="float8_e5m2", weight_gradients="float16",
             master_weights="float16")


RANDOM_BITS = (2, 4, 8, 16)


def _variants():
    """name -> (policy, loss_scaling of `train_policies`)."""
    sr_errors = {"errors": "stochastic"}
    sr_master = {"master_weights": "stochastic"}
    return {
        "float32": (Policy("float32"), "none"),
        "hfp8": (Policy("hfp8_v1", **_HFP8), "none"),
        "hfp8_adaptive": (Policy("hfp8_v1", **_HFP8), "adaptive"),
        "hfp8_dynamic": (Policy("hfp8_v1", **_HFP8), "dynamic"),
        "hfp8_adaptive_sr_errors": (Policy("hfp8_sr_errors", **_HFP8, rounding=sr_errors),
                                    "adaptive"),
        "hfp8_adaptive_sr_master": (Policy("hfp8_sr_master", **_HFP8, rounding=sr_master),
                                    "adaptive"),
        "hfp8_adaptive_fp16_states": (Policy("hfp8_fp16_states", **_HFP8,
                                             optimizer_states="float16"), "adaptive"),
        "hfp8_sources": (Policy("hfp8_sources", **_HFP8,
                                rounding={**sr_errors, **sr_master}), "adaptive"),
        # Stochastic rounding of the errors on r random bits (P3109 / ARITH 2025: how
        # many random bits does training need?); `hfp8_adaptive_sr_errors` draws all.
        **{f"hfp8_adaptive_sr{r}_errors": (
            Policy(f"hfp8_sr{r}_errors", **_HFP8, rounding={"errors": f"stochastic_r{r}"}),
            "adaptive") for r in RANDOM_BITS},
        # The earlier one-seed ablation's other variants.
        "hfp8_adaptive_fp32_master": (Policy("hfp8_fp32_master",
                                             **dict(_HFP8, master_weights=None)), "adaptive"),
        "forward_only": (Policy("hfp8_forward_only", **_FORWARD), "adaptive"),
    }


DEFAULT = ["float32", "hfp8", "hfp8_adaptive", "hfp8_dynamic", "hfp8_adaptive_sr_errors",
           "hfp8_adaptive_sr_master", "hfp8_adaptive_fp16_states", "hfp8_sources"]

_EPOCHS = flags.DEFINE_integer("epochs", 15, "Training epochs per variant.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_LIMIT = flags.DEFINE_integer("limit", None, "Training images (default: all 60,000).")
_TEST_LIMIT = flags.DEFINE_integer("test_limit", None, "Test images (default: all 10,000).")
_SCHEDULE = flags.DEFINE_enum("learning_rate_schedule", "constant",
                              experiment.LEARNING_RATE_SCHEDULES,
                              "Constant learning rate, or cosine decay to 0 over the run.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (initial weights, data order).")
_VARIANTS = flags.DEFINE_list("variants", DEFAULT, "Variants to train, in this order.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/hfp8_ablation",
                                  "Folder of seed<N>/<variant>/results.json and ablation.json.")
_RANGE_CHECK = flags.DEFINE_boolean("range_check", False,
                                    "Print the range check instead of training the variants.")


def run(output_dir, variants, seeds, **train_kwargs):
    """Trains what is missing; returns {variant: {seed: results of train_policies}}."""
    table = _variants()
    unknown = [v for v in variants if v not in table]
    if unknown:
        raise app.UsageError(f"unknown variants {unknown}; known: {', '.join(table)}")
    experiment.check_writable_dir(output_dir)
    results = {}
    for seed in seeds:
        for name in variants:
            path = os.path.join(output_dir, f"seed{seed}", name, "results.json")
            if not os.path.exists(path):
                policy, loss_scaling = table[name]
                experiment.train_policies(
                    "resnet20", "fashion_mnist", [policy], loss_scaling=loss_scaling,
                    seed=seed, output_dir=os.path.dirname(path), verbose=2, **train_kwargs)
            with open(path) as file:
                results.setdefault(name, {})[seed] = json.load(file)
    with open(os.path.join(output_dir, "ablation.json"), "w") as file:
        json.dump(summary(results), file, indent=2)
    return results


def summary(results):
    """Per variant: the configuration, per-seed final test accuracy and curves, mean, std."""
    out = {}
    for name, runs in results.items():
        per_seed = {str(seed): next(iter(r["policies"].values())) for seed, r in runs.items()}
        accuracies = [100 * row["test_accuracy"] for row in per_seed.values()]
        any_run = next(iter(runs.values()))
        out[name] = {
            "policy": next(iter(any_run["policies"])),
            "config": {k: v for k, v in any_run["config"].items() if k != "seed"},
            "test_accuracy_percent": {s: 100 * r["test_accuracy"] for s, r in per_seed.items()},
            "val_accuracy_per_epoch": {s: r["history"]["val_accuracy"]
                                       for s, r in per_seed.items()},
            "seconds": {s: r["seconds"] for s, r in per_seed.items()},
            "mean": float(np.mean(accuracies)),
            "std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else None,
            # The best epoch's test accuracy: on small subsets the last epoch's swings
            # by several points from one epoch to the next.
            "best_epoch_mean": float(np.mean([100 * max(r["history"]["val_accuracy"])
                                              for r in per_seed.values()])),
        }
    return out


def markdown(summary_):
    reference = summary_.get("float32", {}).get("mean")
    lines = ["| variant | loss scaling | final test accuracy (mean ± std) | per seed | "
             "vs float32 | best epoch (mean) |", "|---|---|---|---|---|---|"]
    for name, row in summary_.items():
        spread = "" if row["std"] is None else f" ± {row['std']:.2f}"
        seeds = ", ".join(f"{v:.2f}" for v in row["test_accuracy_percent"].values())
        delta = "" if reference is None else f"{row['mean'] - reference:+.2f} pt"
        lines.append(f"| {name} | {row['config']['loss_scaling']} | {row['mean']:.2f}{spread} % "
                     f"| {seeds} | {delta} | {row['best_epoch_mean']:.2f} % |")
    return "\n".join(lines)


def range_check(seed=0):
    fmt = formats.get("hfp8_fwd")
    keras.utils.set_random_seed(seed)
    (x, y), (x_test, _) = datasets.fashion_mnist(limit=10000, test_limit=256)
    model = models.resnet20(input_shape=x.shape[1:], num_classes=10)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=128, verbose=0)
    gemms = [layer for layer in model.layers
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    inputs = keras.Model(model.inputs, [layer.input for layer in gemms]).predict(
        x_test, verbose=0)
    print(f"{'layer':<28} {'max|x|':>7} {'|x|>max':>8} {'0<|x|<min':>10} {'max|w|':>7} "
          f"{'|w|<min':>8}   (1-4-3 bias 11: max {fmt.max:g}, min {fmt.min_subnormal:g})")
    for layer, x_in in zip(gemms, inputs):
        a, w = np.abs(x_in), np.abs(layer.kernel.numpy())
        nonzero = a[a > 0]
        print(f"{layer.name:<28} {a.max():7.2f} {np.mean(a > fmt.max):8.1e} "
              f"{np.mean(nonzero < fmt.min_subnormal):10.1e} {w.max():7.3f} "
              f"{np.mean(w < fmt.min_subnormal):8.1e}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _RANGE_CHECK.value:
        range_check(int(_SEEDS.value[0]))
        return
    results = run(_OUTPUT_DIR.value, _VARIANTS.value, [int(s) for s in _SEEDS.value],
                  epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value, limit=_LIMIT.value,
                  test_limit=_TEST_LIMIT.value, learning_rate_schedule=_SCHEDULE.value)
    print()
    print(markdown(summary(results)))


if __name__ == "__main__":
    app.run(main)
