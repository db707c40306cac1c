r"""Loss-scaling experiment: one CNN, FP8 and HFP8, five ways of scaling the errors.

    .venv/bin/python -m models.loss_scaling \
        --json docs/loss_scaling_results.json --plot docs/loss_scaling.png
    .venv/bin/python -m models.loss_scaling \
        --from_json docs/loss_scaling_results.json   # table (and plot) only, no training

Trains `tfhfp8.models.small_cnn` on real Fashion-MNIST images, from the same initial
weights (and the same shuffling and dropout), in float32 and then under each policy
(`fp8`, `hfp8`) with each loss-scaling option:

- `none`:     no scaling: `Q_e(dy)`.
- `fixed`:    one constant global scale `S`: Keras' own constant loss scaling, the
              inner optimizer's `loss_scale_factor=S` (loss x S, gradients / S; no
              check for inf/NaN, no skipped steps).
- `dynamic`:  `keras.optimizers.LossScaleOptimizer` (Keras' dynamic scaling: start at
              2^15, x2 after 2000 clean steps, /2 and skip the step on inf/NaN).
- `enhanced`: `tfhfp8.loss_scaling.DynamicLossScaleOptimizer`: the same, with a floor
              the scale never drops below (Mellempudi et al. 2019).
- `adaptive`: `tfhfp8.loss_scaling.Adaptive` on the policy: a power-of-two scale per
              GEMM from the statistics of its own errors and weights (Zhao et al. 2019).

Every policy is spelled out: `tfhfp8.Policy(preset, loss_scaling=None or Adaptive(...),
exempt_first_last=...)`. With the presets' default (`--exempt_first_last`), the first
and last GEMM layers run in float16 (their errors too); the others in 8 bits.

Reported per run: test accuracy (and its difference from float32), the fraction of
non-zero errors that underflowed to zero in `Q_e` per GEMM layer (mean over all
training steps, from `tfhfp8.callbacks.QuantizationStats`), the largest per-layer
saturation fraction (errors beyond the format's max, clamped), the steps skipped on
inf/NaN, the global scale at the end, and the fraction of weight-gradient entries that
are exactly zero after `Q_g` at the end of training (one batch, loss scaled as in
training).
"""

import json
import math
import os
import re
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfhfp8  # noqa: E402
from tfhfp8 import datasets, loss_scaling, models, program  # noqa: E402

SCALINGS = ("none", "fixed", "dynamic", "enhanced", "adaptive")

_POLICIES = flags.DEFINE_list("policies", "fp8,hfp8", "Policy presets to compare.")
_SCALINGS = flags.DEFINE_list("scalings", ",".join(SCALINGS),
                              "Loss-scaling options: " + ", ".join(SCALINGS) + ".")
_LIMIT = flags.DEFINE_integer("limit", 10000, "Fashion-MNIST training examples (the first N).")
_TEST_LIMIT = flags.DEFINE_integer("test_limit", 10000, "Test examples (the first N).")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Training epochs per run.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"],
                               "Inner optimizer: Adam, or SGD with momentum 0.9.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
_FIXED = flags.DEFINE_integer("fixed_scale_log2", 10, "fixed: the constant scale is 2^N.")
_INITIAL = flags.DEFINE_integer("initial_scale_log2", 15,
                                "dynamic/enhanced: the initial scale is 2^N (Keras: 15).")
_GROWTH = flags.DEFINE_integer("growth_steps", 2000,
                               "dynamic/enhanced: double after N clean steps (Keras: 2000).")
_FLOOR = flags.DEFINE_integer("min_scale_log2", 10,
                              "enhanced: the scale never drops below 2^N.")
_UNDERFLOW_RATE = flags.DEFINE_float("underflow_rate", 1e-3,
                                     "adaptive: target underflow fraction per GEMM (n_uf).")
_EXEMPT = flags.DEFINE_boolean(
    "exempt_first_last", True,
    "Keep the first and last GEMM layers in float16 (the presets' default, as in the "
    "papers); --noexempt_first_last runs every GEMM in 8 bits.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial weights, shuffling and dropout.")
_JSON = flags.DEFINE_string("json", "loss_scaling_results.json", "Where to write the results.")
_PLOT = flags.DEFINE_string("plot", "loss_scaling.png", "Where to write the plot ('' for none).")
_FROM_JSON = flags.DEFINE_string(
    "from_json", None, "Train nothing: print the table of this results file (and write "
    "--plot from it).")


# --------------------------------------------------------------------------------------------
# The configurations


def make_policy(preset, scaling):
    """The policy of one run, every choice explicit."""
    per_layer = (loss_scaling.Adaptive(underflow_rate=_UNDERFLOW_RATE.value)
                 if scaling == "adaptive" else None)
    return tfhfp8.Policy(preset, loss_scaling=per_layer, exempt_first_last=_EXEMPT.value)


def make_optimizer(scaling):
    def inner(loss_scale_factor=None):
        if _OPTIMIZER.value == "sgd":
            return keras.optimizers.SGD(_LEARNING_RATE.value, momentum=0.9,
                                        loss_scale_factor=loss_scale_factor)
        return keras.optimizers.Adam(_LEARNING_RATE.value, loss_scale_factor=loss_scale_factor)

    if scaling == "fixed":
        return inner(2.0**_FIXED.value)
    if scaling == "dynamic":
        return keras.optimizers.LossScaleOptimizer(
            inner(), initial_scale=2.0**_INITIAL.value, dynamic_growth_steps=_GROWTH.value)
    if scaling == "enhanced":
        return loss_scaling.DynamicLossScaleOptimizer(
            inner(), initial_scale=2.0**_INITIAL.value, dynamic_growth_steps=_GROWTH.value,
            min_scale=2.0**_FLOOR.value)
    return inner()


def describe(scaling):
    return {
        "float32": "float32 reference, no emulation",
        "none": "no loss scaling",
        "fixed": f"constant global scale 2^{_FIXED.value} (inner optimizer's loss_scale_factor)",
        "dynamic": (f"keras.optimizers.LossScaleOptimizer(initial_scale=2^{_INITIAL.value}, "
                    f"dynamic_growth_steps={_GROWTH.value})"),
        "enhanced": (f"tfhfp8.loss_scaling.DynamicLossScaleOptimizer(initial_scale="
                     f"2^{_INITIAL.value}, dynamic_growth_steps={_GROWTH.value}, "
                     f"min_scale=2^{_FLOOR.value})"),
        "adaptive": (f"Policy(loss_scaling=tfhfp8.loss_scaling.Adaptive(underflow_rate="
                     f"{_UNDERFLOW_RATE.value:g}))"),
    }[scaling]


def global_scale(optimizer):
    """The global loss scale the optimizer applies now (1 without one)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return float(optimizer.dynamic_scale.numpy())
    return float(optimizer.loss_scale_factor or 1.0)


class GlobalScaleLog(keras.callbacks.Callback):
    """The global loss scale after every training step."""

    def __init__(self):
        super().__init__()
        self.scales = []

    def on_train_batch_end(self, batch, logs=None):
        self.scales.append(global_scale(self.model.optimizer))


# --------------------------------------------------------------------------------------------
# One run


def gemm_layers(model):
    return [layer for layer in model.layers if isinstance(layer, tfhfp8.layers.EmulatedLayer)]


def weight_gradient_zeros(model, x, y):
    """Per GEMM layer: the fraction of kernel-gradient entries that are exactly zero.

    One training-mode pass with the loss scaled as the optimizer scales it, so the
    gradients are those `Q_g` produced (still multiplied by the global scale).
    Runs after evaluation: it updates the BatchNorm statistics and the layer scales.
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    layers = gemm_layers(model)
    with tf.GradientTape() as tape:
        loss = model.optimizer.scale_loss(loss_fn(y, model(x, training=True)))
    grads = tape.gradient(loss, [layer.kernel for layer in layers])
    return {layer.name: float(np.mean(g.numpy() == 0)) for layer, g in zip(layers, grads)}


def train_one(base, preset, scaling, data):
    (x_train, y_train), (x_test, y_test) = data
    policy = tfhfp8.Policy("float32") if preset == "float32" else make_policy(preset, scaling)
    model = tfhfp8.quantize_model(base, policy)  # copies base's initial weights
    model.compile(make_optimizer(scaling), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    stats, scales = tfhfp8.callbacks.QuantizationStats(), GlobalScaleLog()
    keras.utils.set_random_seed(_SEED.value)  # same shuffling and dropout in every run
    wall, cpu = time.perf_counter(), time.process_time()
    history = model.fit(x_train, y_train, epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value,
                        validation_data=(x_test, y_test), callbacks=[stats, scales],
                        verbose=0)
    test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = len(scales.scales)
    optimizer = model.optimizer
    skipped = steps - int(optimizer.iterations.numpy())  # LossScaleOptimizer: clean steps
    zeros = weight_gradient_zeros(model, x_train[:256], y_train[:256])

    layers = {}
    for layer in gemm_layers(model):
        errors = layer.policy.errors
        key = f"{layer.name}/gemm"
        entry = dict(errors=None if errors is None else errors.name,
                     exempt=layer.policy.exempt_of is not None,
                     weight_gradient_zero=zeros[layer.name])
        series = {stat: stats.steps.get(f"{key}/{stat}")
                  for stat in ("underflow", "saturation", "scale")}
        for stat, values in series.items():
            if values is not None:
                entry[f"{stat}_mean"] = float(np.mean(values))
        if series["underflow"] is not None:
            entry["underflow_steps"] = [float(f"{v:.3g}") for v in series["underflow"]]
        if series["saturation"] is not None:
            entry["saturation_max"] = float(np.max(series["saturation"]))
        if series["scale"] is not None:  # powers of two
            entry["scale_log2_steps"] = [int(round(math.log2(v))) for v in series["scale"]]
        layers[layer.name] = entry
    return dict(
        policy=preset, scaling=scaling, description=describe(scaling),
        test_accuracy=float(test_accuracy), test_loss=float(test_loss),
        steps=steps, skipped_steps=skipped,
        enhanced_skipped_counter=(int(optimizer.skipped_steps.numpy())
                                  if hasattr(optimizer, "skipped_steps") else None),
        global_scale_final=global_scale(optimizer),
        global_scale_min=min(scales.scales) if scales.scales else None,
        global_scale_max=max(scales.scales) if scales.scales else None,
        finite=bool(np.all(np.isfinite(history.history["loss"]))),
        layers=layers, seconds=wall, cpu_seconds=cpu,
        history={k: [float(v) for v in values] for k, values in history.history.items()})


# --------------------------------------------------------------------------------------------
# Output


def _pct(value, width):
    """A fraction as a percentage: 2 decimals, 4 below 0.1%, a power of ten below 1e-4%."""
    if value is None:
        return f"{'-':>{width}}"
    if value == 0:
        return f"{'0':>{width}}"
    if value < 1e-6:
        return f"{100 * value:>{width}.0e}"
    return f"{100 * value:>{width}.{2 if value >= 1e-3 else 4}f}"


def dumps(results):
    """JSON, indented, with each list of numbers on one line."""
    def one_line(match):
        return "[" + ", ".join(value.strip() for value in match.group(1).split(",")) + "]"

    return re.sub(r"\[\s*([-+0-9.e]+(?:,\s*[-+0-9.e]+)*)\s*\]", one_line,
                  json.dumps(results, indent=1))


def table(results):
    runs = results["runs"]
    names = list(runs[-1]["layers"]) if runs else []
    reference = results["float32"]["test_accuracy"]
    exempt = {name for run in runs for name, layer in run["layers"].items() if layer["exempt"]}
    head = (f"{'policy':<6} {'scaling':<9} {'test acc':>8} {'vs fp32':>8} "
            + " ".join(f"{'uf ' + n + ('*' if n in exempt else ''):>14}" for n in names)
            + f" {'max sat':>8} {'skipped':>7} {'scale':>6} {'dW=0':>7}")
    lines = [head, "-" * len(head)]
    lines.append(f"{'fp32':<6} {'-':<9} {100 * reference:>7.2f}% {'':>8} "
                 + " ".join(f"{'-':>14}" for _ in names)
                 + f" {'-':>8} {'-':>7} {'-':>6} "
                 + _pct(np.mean(list(results['float32']['weight_gradient_zero'].values())), 6)
                 + "%")
    for run in runs:
        layers = run["layers"]
        saturation = max(layer.get("saturation_mean", 0.0) for layer in layers.values())
        zero = np.mean([layer["weight_gradient_zero"] for layer in layers.values()])
        scale = run["global_scale_final"]
        scale = "-" if scale == 1 else f"2^{int(math.log2(scale))}"
        lines.append(
            f"{run['policy']:<6} {run['scaling']:<9} {100 * run['test_accuracy']:>7.2f}% "
            f"{100 * (run['test_accuracy'] - reference):>+6.2f}pt "
            + " ".join(_pct(layers[n].get("underflow_mean"), 13) + "%" for n in names)
            + f" {_pct(saturation, 7)}% {run['skipped_steps']:>7d} {scale:>6} "
            + _pct(zero, 6) + "%")
    lines.append("")
    lines.append("uf <layer>: errors (non-zero dy) that underflowed to 0 in Q_e, % (mean over "
                 "all training steps); * = exempt layer, errors in float16.")
    lines.append("max sat: largest per-layer mean fraction of errors beyond the format's max "
                 "(clamped), %. skipped: steps skipped on inf/NaN. scale: global scale at the "
                 "end.")
    lines.append("dW=0: kernel-gradient entries exactly 0 after Q_g, % of all GEMM kernels "
                 "(one batch of 256 at the end of training).")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(run["policy"] for run in results["runs"]))
    names = list(results["runs"][-1]["layers"])
    figure, axes = plt.subplots(len(presets), 3, figsize=(16, 4.2 * len(presets)),
                                squeeze=False)
    colors = dict(zip(SCALINGS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    window = 10
    for row, preset in zip(axes, presets):
        runs = [run for run in results["runs"] if run["policy"] == preset]
        bars, curves, accuracy = row
        width = 0.8 / len(runs)
        for i, run in enumerate(runs):
            values = [max(run["layers"][n].get("underflow_mean", 0.0), 1e-8) for n in names]
            bars.bar(np.arange(len(names)) + (i - (len(runs) - 1) / 2) * width,
                     [100 * v for v in values], width, label=run["scaling"],
                     color=colors.get(run["scaling"]))
            # Errors of every GEMM together: per step, the mean over layers.
            series = np.mean([run["layers"][n]["underflow_steps"] for n in names
                              if "underflow_steps" in run["layers"][n]], axis=0)
            smooth = np.convolve(series, np.ones(window) / window, mode="valid")
            curves.plot(np.arange(len(smooth)) + window, 100 * np.maximum(smooth, 1e-7),
                        linestyle=":" if run["scaling"] == "enhanced" else "-",
                        label=run["scaling"], color=colors.get(run["scaling"]))
            epochs = np.arange(1, len(run["history"]["val_accuracy"]) + 1)
            accuracy.plot(epochs, 100 * np.array(run["history"]["val_accuracy"]), marker="o",
                          linestyle=":" if run["scaling"] == "enhanced" else "-",
                          label=run["scaling"], color=colors.get(run["scaling"]))
        reference = results["float32"]["history"]["val_accuracy"]
        accuracy.plot(np.arange(1, len(reference) + 1), 100 * np.array(reference), "k--",
                      marker="s", label="float32")
        exempt = {n for run in runs for n in names if run["layers"][n]["exempt"]}
        bars.set_xticks(range(len(names)),
                        [n + ("\n(float16)" if n in exempt else "") for n in names], fontsize=8)
        bars.set(yscale="log", ylabel="errors underflowed (%; 0 drawn as 1e-6)",
                 title=f"{preset}: underflow per layer, mean over steps")
        curves.set(yscale="log", xlabel="training step", ylabel="errors underflowed (%)",
                   title=f"{preset}: underflow over training (mean of layers, "
                         f"{window}-step average)")
        accuracy.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{preset}: test accuracy")
        accuracy.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        for axis in row:
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    config = results["config"]
    figure.suptitle(f"{config['model']} on {config['train_examples']} Fashion-MNIST images, "
                    f"{config['epochs']} epochs, {config['optimizer']} lr "
                    f"{config['learning_rate']:g}, batch {config['batch_size']}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


# --------------------------------------------------------------------------------------------


def main(argv):
    del argv
    if _FROM_JSON.value:
        with open(_FROM_JSON.value) as file:
            results = json.load(file)
        print(table(results))
        if _PLOT.value and results["runs"]:
            plot(results, _PLOT.value)
            print(f"Wrote {_PLOT.value}")
        return
    unknown = set(_SCALINGS.value) - set(SCALINGS)
    if unknown:
        raise app.UsageError(f"--scalings: unknown {sorted(unknown)}; known: {SCALINGS}")
    start = time.perf_counter()
    data = datasets.fashion_mnist(limit=_LIMIT.value, test_limit=_TEST_LIMIT.value)
    keras.utils.set_random_seed(_SEED.value)
    base = models.small_cnn(input_shape=data[0][0].shape[1:], num_classes=10)
    config = dict(model="small_cnn", dataset="fashion_mnist",
                  train_examples=len(data[0][0]), test_examples=len(data[1][0]),
                  epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value,
                  optimizer=_OPTIMIZER.value, learning_rate=_LEARNING_RATE.value,
                  seed=_SEED.value, exempt_first_last=_EXEMPT.value,
                  fixed_scale=2.0**_FIXED.value, initial_scale=2.0**_INITIAL.value,
                  growth_steps=_GROWTH.value, min_scale=2.0**_FLOOR.value,
                  underflow_rate=_UNDERFLOW_RATE.value,
                  command=".venv/bin/python -m models.loss_scaling " + " ".join(sys.argv[1:]),
                  tensorflow=tf.__version__, keras=keras.__version__,
                  backend=tfhfp8.ops.backend_info())
    results = dict(config=config)

    print("float32 ...", flush=True)
    reference = train_one(base, "float32", "none", data)
    results["float32"] = dict(
        test_accuracy=reference["test_accuracy"], test_loss=reference["test_loss"],
        history=reference["history"], seconds=reference["seconds"],
        cpu_seconds=reference["cpu_seconds"],
        weight_gradient_zero={n: v["weight_gradient_zero"]
                              for n, v in reference["layers"].items()})
    print(f"  {100 * reference['test_accuracy']:.2f}%  ({reference['cpu_seconds']:.0f} s CPU)",
          flush=True)
    results["runs"] = []
    for preset in _POLICIES.value:
        for scaling in _SCALINGS.value:
            print(f"{preset} / {scaling}: {describe(scaling)} ...", flush=True)
            run = train_one(base, preset, scaling, data)
            results["runs"].append(run)
            print(f"  {100 * run['test_accuracy']:.2f}%, skipped {run['skipped_steps']}  "
                  f"({run['cpu_seconds']:.0f} s CPU)", flush=True)
    config["seconds"] = time.perf_counter() - start
    config["cpu_seconds"] = (reference["cpu_seconds"]
                             + sum(run["cpu_seconds"] for run in results["runs"]))

    text = table(results)
    results["table"] = text
    print()
    print(text)
    print(f"\n{config['seconds']:.0f} s wall, {config['cpu_seconds']:.0f} s CPU in training "
          "and evaluation")
    if _JSON.value:
        os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
        with open(_JSON.value, "w") as file:
            file.write(dumps(results))
        print(f"Wrote {_JSON.value}")
    if _PLOT.value and results["runs"]:
        plot(results, _PLOT.value)
        print(f"Wrote {_PLOT.value}")


if __name__ == "__main__":
    program.run(main)
