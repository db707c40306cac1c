"""tfmot's default 8-bit integer QAT vs tfhfp8's hfp8 QAT through the tfmot bridge.

    TF_USE_LEGACY_KERAS=1 python -m models.tfmot_comparison --train_size=10000 \
        --test_size=2000 --epochs=3 --seeds=0,1 --output=docs/results/tfmot_comparison.json

One small tf-keras CNN (Conv 16, pool, Conv 32, pool, Dense 64, Dense 10) on a
Fashion-MNIST subset, trained from the same initial weights per seed in three ways:
FP32; tfmot's `quantize_model` (default 8-bit scheme: int8 fake quantization of weights,
per channel, and activations, per tensor, with learned ranges); and
`quantize_apply(..., scheme=tfhfp8.tfmot.Scheme("hfp8"))` (1-4-3 weights and activations,
1-5-2 errors, float16 weight gradients and master weights, first and last GEMM in
float16). Per seed: test accuracy, agreement of the test predictions with the FP32
model's, and the median wall time of a training step (each step timed around
`train_on_batch`, first epoch's first 5 steps left out). Writes one JSON file with every
seed's values (after every seed) and prints a Markdown table of means;
`--table=FILE` prints the table of an earlier run's JSON.

tfmot needs tf-keras: TF_USE_LEGACY_KERAS=1 is set here before TensorFlow is imported.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

import models  # noqa: E402

_TRAIN = flags.DEFINE_integer("train_size", 10000, "Training images (first N of 60,000).")
_TEST = flags.DEFINE_integer("test_size", 2000, "Test images (first N of 10,000).")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Training epochs.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (initial weights and data order).")
_OUTPUT = flags.DEFINE_string("output", "docs/results/tfmot_comparison.json",
                              "Where the per-seed JSON goes.")
_TABLE = flags.DEFINE_string("table", None, "Only print the Markdown table of this JSON "
                             "file (written by an earlier run), then exit.")

VARIANTS = ("fp32", "tfmot_int8", "tfhfp8_hfp8")


def build(tk):
    return tk.Sequential([
        tk.Input((28, 28, 1)),
        tk.layers.Conv2D(16, 3, activation="relu", name="conv1"),
        tk.layers.MaxPooling2D(name="pool1"),
        tk.layers.Conv2D(32, 3, activation="relu", name="conv2"),
        tk.layers.MaxPooling2D(name="pool2"),
        tk.layers.Flatten(name="flatten"),
        tk.layers.Dense(64, activation="relu", name="dense1"),
        tk.layers.Dense(10, name="logits")])


def variant(name, initial, tk, tfmot, scheme_module):
    """The model of one variant, from the FP32 model `initial` (same weights)."""
    keras_q = tfmot.quantization.keras
    model = tk.models.clone_model(initial)
    model.set_weights(initial.get_weights())
    if name == "tfmot_int8":
        return keras_q.quantize_model(model)
    if name == "tfhfp8_hfp8":
        annotated = tk.models.clone_model(
            model, clone_function=lambda layer: (
                keras_q.quantize_annotate_layer(layer.__class__.from_config(layer.get_config()))
                if isinstance(layer, (tk.layers.Conv2D, tk.layers.Dense))
                else layer.__class__.from_config(layer.get_config())))
        annotated.set_weights(model.get_weights())
        return keras_q.quantize_apply(annotated, scheme=scheme_module.Scheme("hfp8"))
    return model


def train(model, data, seed, tk):
    (x, y), (x_test, y_test) = data
    model.compile(tk.optimizers.Adam(_LR.value),
                  tk.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    rng = np.random.RandomState(seed)
    step_times, losses = [], []
    batch = _BATCH.value
    for epoch in range(_EPOCHS.value):
        order = rng.permutation(len(x))
        for i, start in enumerate(range(0, len(x), batch)):
            index = order[start:start + batch]
            begin = time.perf_counter()
            loss, _ = model.train_on_batch(x[index], y[index])
            elapsed = time.perf_counter() - begin
            if epoch > 0 or i >= 5:
                step_times.append(elapsed)
        losses.append(float(loss))
    logits = model.predict(x_test, batch_size=500, verbose=0)
    return {"predictions": np.argmax(logits, -1),
            "test_accuracy": float(np.mean(np.argmax(logits, -1) == y_test)),
            "final_batch_loss_per_epoch": losses,
            "median_step_seconds": float(np.median(step_times)),
            "finite": bool(all(np.all(np.isfinite(w)) for w in model.get_weights()))}


def main(argv):
    del argv
    if _TABLE.value:
        print(table(json.loads(pathlib.Path(_TABLE.value).read_text())))
        return
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tfhfp8
    import tfhfp8.tfmot

    tk = tf.keras
    (x, y), (x_test, y_test) = tfhfp8.datasets.fashion_mnist(
        limit=_TRAIN.value, test_limit=_TEST.value)
    data = ((x, y), (x_test, y_test))
    runs = []
    for seed in [int(s) for s in _SEEDS.value]:
        tk.utils.set_random_seed(seed)
        initial = build(tk)
        run = {"seed": seed}
        for name in VARIANTS:
            tk.utils.set_random_seed(seed)  # same data order and dropout-free init reuse
            model = variant(name, initial, tk, tfmot, tfhfp8.tfmot)
            start = time.perf_counter()
            result = train(model, data, seed, tk)
            result["seconds"] = time.perf_counter() - start
            run[name] = result
            print(f"seed {seed} {name}: accuracy {result['test_accuracy']:.4f}, "
                  f"step {1e3 * result['median_step_seconds']:.1f} ms", flush=True)
        for name in VARIANTS:
            run[name]["agreement_with_fp32"] = float(np.mean(
                run[name]["predictions"] == run["fp32"]["predictions"]))
        for name in VARIANTS:
            del run[name]["predictions"]
        runs.append(run)
        write(runs, x, x_test, tf, tfhfp8)  # after every seed: a cut-short run keeps its seeds
    out = write(runs, x, x_test, tf, tfhfp8)
    print(table(out))


def write(runs, x, x_test, tf, tfhfp8):
    out = {"command": "TF_USE_LEGACY_KERAS=1 python -m models.tfmot_comparison "
                      f"--train_size={_TRAIN.value} --test_size={_TEST.value} "
                      f"--epochs={_EPOCHS.value} --batch_size={_BATCH.value} "
                      f"--learning_rate={_LR.value} --seeds={','.join(_SEEDS.value)}",
           "data": f"Fashion-MNIST, first {len(x)} training and {len(x_test)} test images",
           "cpu": models.cpu_name(),
           "load_average_at_end": os.getloadavg(),
           "threads": {k: os.environ.get(k) for k in ("TF_NUM_INTRAOP_THREADS",
                                                       "TF_NUM_INTEROP_THREADS")},
           "versions": {"tensorflow": tf.__version__, "tf_keras": version("tf-keras"),
                        "tfmot": version("tensorflow-model-optimization"),
                        "tfhfp8": tfhfp8.__version__},
           "seeds": runs}
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out



def table(out):
    """A Markdown table of means over seeds (step time relative to FP32's too)."""
    runs = out["seeds"]
    fp32_step = np.mean([r["fp32"]["median_step_seconds"] for r in runs])
    lines = ["| variant | test accuracy (mean; per seed) | agreement with FP32 | "
             "step time (median, mean over seeds) | vs FP32 |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        acc = [100 * r[name]["test_accuracy"] for r in runs]
        agree = [100 * r[name]["agreement_with_fp32"] for r in runs]
        step = np.mean([r[name]["median_step_seconds"] for r in runs])
        lines.append(f"| {name} | {np.mean(acc):.2f} % ({', '.join(f'{a:.2f}' for a in acc)}) "
                     f"| {np.mean(agree):.2f} % | {1e3 * step:.1f} ms | {step / fp32_step:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    from tfhfp8 import program
    program.run(main)
