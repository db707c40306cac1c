r"""Accumulation study: Wang et al. 2018's finding at small scale.

    TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 nice -n 19 \
        .venv/bin/python -m models.accumulation --json docs/results/accumulation.json
    .venv/bin/python -m models.accumulation --from_json docs/results/accumulation.json

Trains a small CNN (`--model`; see `build_model`) on the first `--limit` Fashion-MNIST
training images, from the same initial weights per seed, under:

- `float32`: no emulation (reference);
- `fp8` (Wang et al.'s formats, `tfhfp8.Policy("fp8")`) with FP32 sums, FP16 sums
  (`accumulation="float16"`) and FP16 sums in chunks of 64 (`"float16_chunk64"`);
- `int16_dfp` (Das et al.) with FP32 sums, INT32 sums (`"int32"`) and Das et al.'s
  remedy for INT32 overflow, INT32 partial sums of 64 products flushed into an FP32
  sum (`tfhfp8.Accumulator("int32", chunk_size=64)`; not in the default `--runs`,
  select it by name);
- tensor cores (by name, not in the default `--runs`): E4M3 weights and activations,
  E5M2 errors (no per-tensor scaling), summed in FP32, as H100's FP8 `wgmma` sums and
  with DeepSeek-V3's promotion every 128 products (`TENSOR_CORE_RUNS`); and the same
  formats with per-tensor delayed scaling: `fp8_delayed` (FP32 sums), `fp8_hopper` and
  `fp8_hopper_promoted` (`PRESET_RUNS`).

Why 64: an INT16 mantissa product is below 2^30 in magnitude and INT32 holds 2^31, so
no chunk length rules overflow out (two worst-case products already overflow);
chunks bound the damage to a partial sum of n products instead of a running sum of
K. 64 is Wang et al.'s chunk length for FP16 sums, which keeps the FP32 flushes to
one per 64 multiply-adds, and it is the run's `--int32_chunk` flag.

Every GEMM of training (forward, input gradient, weight gradient) sums as the
policy says, exempt first and last layers included (in FP16 formats; an `int32`
policy has no exempt layers). Reported: test accuracy per seed, mean and spread,
the mean fraction of swamped additions per GEMM kind and the INT32 overflows over the
last epoch (`tfhfp8.callbacks.QuantizationStats`), and the training time per step.
"""

import json
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402

import tfhfp8  # noqa: E402
from tfhfp8 import datasets  # noqa: E402

RUNS = {
    "float32": ("float32", None),
    "fp8 + fp32 sums": ("fp8", None),
    "fp8 + fp16 sums": ("fp8", "float16"),
    "fp8 + fp16 chunk 64": ("fp8", "float16_chunk64"),
    "int16_dfp + fp32 sums": ("int16_dfp", None),
    "int16_dfp + int32 sums": ("int16_dfp", "int32"),
}
# Das et al.'s remedy; run it by name (`--runs "int16_dfp + int32 chunks"`).
INT32_CHUNKS = "int16_dfp + int32 chunks"
# Tensor cores (issue 26), run by name: E4M3 weights and activations, E5M2 errors
# (Transformer Engine's HYBRID formats, here without its per-tensor scaling), summed
# in FP32, as H100's FP8 wgmma sums (13 fraction bits, e8m13) and with DeepSeek-V3's
# promotion to FP32 every 128.
E4M3_E5M2 = dict(weights="float8_e4m3fn", activations="float8_e4m3fn", errors="float8_e5m2")
TENSOR_CORE_RUNS = {
    "e4m3/e5m2 + fp32 sums": (E4M3_E5M2, None),
    "e4m3/e5m2 + hopper fp8 sums": (E4M3_E5M2, "nvidia_hopper_fp8"),
    "e4m3/e5m2 + hopper fp8 promoted every 128": (E4M3_E5M2, "nvidia_hopper_fp8_promote128"),
}
# The same formats with Transformer Engine's per-tensor delayed scaling: FP32 sums
# (`fp8_delayed`), and as an H100 sums them (`fp8_hopper`: fast accumulation forward,
# promotion in dgrad and wgrad; `fp8_hopper_promoted`: promotion in all three).
PRESET_RUNS = {
    "fp8_delayed (fp32 sums)": ("fp8_delayed", None),
    "fp8_hopper": ("fp8_hopper", None),
    "fp8_hopper_promoted": ("fp8_hopper_promoted", None),
}
EXTRA_RUNS = (INT32_CHUNKS, *TENSOR_CORE_RUNS, *PRESET_RUNS)

_RUNS = flags.DEFINE_list("runs", ",".join(RUNS),
                          f"Which runs (names as in the table; also {list(EXTRA_RUNS)}).")
_INT32_CHUNK = flags.DEFINE_integer(
    "int32_chunk", 64, f"{INT32_CHUNKS!r}: products per INT32 partial sum before it is "
    "flushed into the FP32 sum.")
_SEEDS = flags.DEFINE_list("seeds", "0,1,2", "Seeds (initial weights, shuffling).")
_LIMIT = flags.DEFINE_integer("limit", 60000, "Fashion-MNIST training examples (first N).")
_TEST_LIMIT = flags.DEFINE_integer("test_limit", 10000, "Test examples (the first N).")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Training epochs per run.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 2e-3, "Adam's learning rate.")
_DOWNSAMPLE = flags.DEFINE_integer("downsample", 2,
                                   "Average-pool the 28x28 images by this factor first.")
_JSON = flags.DEFINE_string("json", None, "Write the per-seed results here.")
_FROM_JSON = flags.DEFINE_list("from_json", None,
                               "Print the table of results files (their runs together, "
                               "e.g. the main study and a run added later).")


def build_model(input_shape, num_classes, downsample):
    """AvgPool(downsample) -> [Conv2D 3x3 + BN + ReLU + MaxPool] x (8, 16 filters) ->
    Flatten -> Dense(num_classes)."""
    inputs = keras.Input(input_shape)
    x = keras.layers.AveragePooling2D(downsample)(inputs) if downsample > 1 else inputs
    for filters in (8, 16):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="accumulation_cnn")


def run_setting(name):
    """(preset or Policy keyword arguments, accumulation) of the run `name`."""
    if name == INT32_CHUNKS:
        return "int16_dfp", tfhfp8.Accumulator("int32", chunk_size=_INT32_CHUNK.value)
    return {**RUNS, **TENSOR_CORE_RUNS, **PRESET_RUNS}[name]


def run(name, seed, data):
    preset, accumulation = run_setting(name)
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    base = build_model(x_train.shape[1:], 10, _DOWNSAMPLE.value)
    if isinstance(preset, dict):
        policy = tfhfp8.Policy(**preset, accumulation=accumulation)
    else:
        policy = tfhfp8.Policy(preset, accumulation=accumulation)
    model = tfhfp8.quantize_model(base, policy)
    model.compile(keras.optimizers.Adam(_LEARNING_RATE.value),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    stats = tfhfp8.callbacks.QuantizationStats() if policy.accumulates else None
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value,
                        verbose=0, callbacks=[stats] if stats else [])
    seconds = time.perf_counter() - start
    # Time per step once compiled (first seed only): 5 more steps on one batch.
    step_seconds = None
    if seed == int(_SEEDS.value[0]):
        batch = (x_train[:_BATCH_SIZE.value], y_train[:_BATCH_SIZE.value])
        model.train_on_batch(*batch)
        start_step = time.perf_counter()
        for _ in range(5):
            model.train_on_batch(*batch)
        step_seconds = (time.perf_counter() - start_step) / 5
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    result = dict(run=name, seed=seed, policy=str(policy), test_accuracy=float(accuracy),
                  test_loss=float(loss), train_loss=[float(v) for v in history.history["loss"]],
                  seconds=seconds, steps=len(history.history["loss"]) * -(-len(x_train) //
                                                    _BATCH_SIZE.value),
                  step_seconds=step_seconds)
    if isinstance(accumulation, tfhfp8.Accumulator):
        result["accumulation"] = str(accumulation)
    if stats:
        steps_per_epoch = -(-len(x_train) // _BATCH_SIZE.value)
        last = {key: values[-steps_per_epoch:] for key, values in stats.steps.items()}
        for kind in ("forward", "input_gradient", "weight_gradient"):
            swamping = [np.mean(v) for k, v in last.items() if k.endswith(f"{kind}/swamping")]
            overflows = [np.sum(v) for k, v in last.items()
                         if k.endswith(f"{kind}/int32_overflows")]
            result[f"swamping_{kind}"] = float(np.mean(swamping)) if swamping else None
            result[f"int32_overflows_{kind}"] = float(np.sum(overflows)) if overflows else None
    print(json.dumps(result), flush=True)
    return result


def table(results):
    names = list(dict.fromkeys(r["run"] for r in results["runs"]))
    lines = ["| run | test accuracy (mean ± sd) | per seed | swamped additions fwd / dx / dW "
             "(last epoch) | INT32 overflows (last epoch) | s/step |",
             "|---|---|---|---|---|---|"]
    for name in names:
        rows = [r for r in results["runs"] if r["run"] == name]
        acc = np.array([100 * r["test_accuracy"] for r in rows])
        swamp = "–"
        if rows[0].get("swamping_forward") is not None and "int32" not in name:
            swamp = " / ".join(f"{100 * np.mean([r[f'swamping_{k}'] for r in rows]):.3f}%"
                               for k in ("forward", "input_gradient", "weight_gradient"))
        overflows = "–"
        if rows[0].get("int32_overflows_forward") is not None:
            overflows = f"{np.mean([sum(r[f'int32_overflows_{k}'] for k in ('forward', 'input_gradient', 'weight_gradient')) for r in rows]):.0f}"
        lines.append(f"| {name} | {acc.mean():.2f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.2f} | "
                     f"{', '.join(f'{a:.2f}' for a in acc)} | {swamp} | {overflows} | "
                     f"{np.median([r['step_seconds'] for r in rows if r['step_seconds']]):.3f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    if _FROM_JSON.value:
        runs = []
        for path in _FROM_JSON.value:
            with open(path) as file:
                runs += json.load(file)["runs"]
        print(table({"runs": runs}))
        return
    unknown = set(_RUNS.value) - set(RUNS) - set(EXTRA_RUNS)
    if unknown:
        raise app.UsageError(f"--runs: unknown {sorted(unknown)}; known: "
                             f"{list(RUNS) + list(EXTRA_RUNS)}")
    (x_train, y_train), (x_test, y_test) = datasets.load(
        "fashion_mnist", limit=_LIMIT.value, test_limit=_TEST_LIMIT.value)[:2]
    config = dict(limit=len(x_train), test_limit=len(x_test), epochs=_EPOCHS.value,
                  batch_size=_BATCH_SIZE.value, learning_rate=_LEARNING_RATE.value,
                  downsample=_DOWNSAMPLE.value, int32_chunk=_INT32_CHUNK.value,
                  seeds=[int(s) for s in _SEEDS.value],
                  backend=tfhfp8.ops.backend_info()["backend"],
                  accumulation_backend=tfhfp8.ops.accumulation_backend())
    results = {"config": config, "runs": []}
    for seed in config["seeds"]:
        for name in _RUNS.value:
            results["runs"].append(run(name, seed, ((x_train, y_train), (x_test, y_test))))
            if _JSON.value:
                os.makedirs(os.path.dirname(_JSON.value) or ".", exist_ok=True)
                with open(_JSON.value, "w") as file:
                    json.dump(results, file, indent=1)
    print(table(results))


if __name__ == "__main__":
    app.run(main)
