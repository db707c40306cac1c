"""Training-step time of emulated models, as a ratio to the same model in FP32.

Times `model.train_on_batch` on synthetic data for a ResNet-20 (32x32x3 images) and a
2-layer Transformer encoder classifier (the shapes of `tfhfp8 demo`'s text model),
each converted with `tfhfp8.quantize_model(model, policy)` for every policy, plus
Keras 3's own `model.quantize("float8")` (its float8 training mode, on the
Transformer's Dense and EinsumDense layers) as the peer. With `--jit`, the same
models compiled with `jit_compile=True` (tfhfp8 then uses its TF-ops backend inside
XLA) add columns whose ratios are to the XLA-compiled FP32 model; XLA compiles the
emulated models slowly (tens of seconds each), so they are not timed by default.

Every variant is built, compiled and warmed up first; then each timed round runs
every variant for `--steps` steps in turn, so that a slow spell of this shared
machine hits all variants alike. The table gives the median wall-clock time of a
step and its ratio to FP32, and the same for the process's CPU time per step (all
threads): on a machine shared with other jobs the wall-clock time of a step varies
by tens of percent, its CPU time far less. The `float32_copy` row is a second,
identical FP32 model: how far its ratios are from 1 shows the noise of the run.
Compare ratios from one run, never absolute times across runs.

    PYTHONPATH=. python benchmarks/step_overhead.py [--models=resnet20,transformer] [--jit]

Prints a table; asserts nothing.
"""

import gc
import logging
import sys
import time
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import machine  # benchmarks/machine.py
import tfhfp8
from tfhfp8 import models as model_zoo
from tfhfp8 import program

MODELS = ("resnet20", "transformer")
POLICIES = ("float32", "float32_copy", "bfloat16", "hfp8", "int16_dfp", "keras_float8")

_MODELS = flags.DEFINE_list("models", list(MODELS), f"Models to time, from {MODELS}.")
_POLICIES = flags.DEFINE_list(
    "policies", list(POLICIES),
    "Variants to time: tfhfp8 policy presets; float32_copy, a second FP32 model (the noise "
    "check); keras_float8, Keras' own model.quantize('float8') (Transformer only). float32 "
    "always runs: it is the baseline.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size of both models.", lower_bound=1)
_SEQUENCE_LENGTH = flags.DEFINE_integer("sequence_length", 64, "Transformer input length.",
                                        lower_bound=1)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 10000, "Transformer vocabulary.", lower_bound=2)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps of each variant first (the first "
                               "one traces and compiles).", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 1, "Timed steps of each variant per round.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Interleaved timed rounds.", lower_bound=1)
_JIT = flags.DEFINE_boolean("jit", False, "Also time every variant with jit_compile=True.")


def _base_model(name):
    keras.utils.set_random_seed(0)
    if name == "resnet20":
        return model_zoo.resnet20(input_shape=(32, 32, 3), num_classes=10)
    return model_zoo.transformer_classifier(
        vocab_size=_VOCAB_SIZE.value, sequence_length=_SEQUENCE_LENGTH.value, num_classes=2)


def _data(name):
    rng = np.random.default_rng(0)
    n = _BATCH_SIZE.value
    if name == "resnet20":
        x = rng.standard_normal((n, 32, 32, 3), dtype=np.float32)
        y = rng.integers(0, 10, n)
    else:
        x = rng.integers(0, _VOCAB_SIZE.value, (n, _SEQUENCE_LENGTH.value)).astype(np.int32)
        y = rng.integers(0, 2, n)
    return tf.constant(x), tf.constant(y.astype(np.int32))


def _variant(name, policy, base):
    """A copy of `base` in `policy`; None where the variant does not apply."""
    if policy == "keras_float8" and name != "transformer":
        return None  # Keras quantizes only Dense and EinsumDense to float8
    if policy not in ("float32", "float32_copy", "keras_float8"):
        return tfhfp8.quantize_model(base, policy)
    model = keras.models.clone_model(base)
    model.set_weights(base.get_weights())
    if policy == "keras_float8":
        gemms = (keras.layers.Dense, keras.layers.EinsumDense)
        model.quantize("float8", filters=lambda layer: type(layer) in gemms)
    return model


def _compile(model, jit):
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss="sparse_categorical_crossentropy", jit_compile=jit)
    return model


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = (set(_MODELS.value) - set(MODELS)) | (set(_POLICIES.value) - set(POLICIES))
    if unknown:
        raise app.UsageError(f"unknown models or policies: {sorted(unknown)}")
    policies = ["float32"] + [p for p in _POLICIES.value if p != "float32"]
    # Dozens of models each trace Keras' step function once: not a retracing problem.
    tf.get_logger().setLevel(logging.ERROR)
    modes = [False, True] if _JIT.value else [False]
    print(machine.describe())
    print(f"tfhfp8 backend outside XLA: {tfhfp8.ops.backend_info()['backend']}")
    print(f"batch {_BATCH_SIZE.value}; median of {_ROUNDS.value} interleaved rounds x "
          f"{_STEPS.value} steps after {_WARMUP.value} warm-up steps; "
          f"load average before: {machine.load_average()}")

    # Build, compile and warm up every variant: (model, policy, jit) -> (model, data).
    variants = {}
    for name in _MODELS.value:
        base = _base_model(name)
        data = _data(name)
        for policy in policies:
            for jit in modes:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = _variant(name, policy, base)
                if model is None:
                    continue
                _compile(model, jit)
                start = time.perf_counter()
                try:
                    for _ in range(_WARMUP.value):
                        model.train_on_batch(*data)
                except Exception as error:  # e.g. an XLA lowering failure: report it, go on
                    print(f"{name} {policy} jit={jit}: {type(error).__name__}: "
                          f"{str(error).splitlines()[0][:120]}", file=sys.stderr)
                    continue
                print(f"  warm-up {name:11s} {policy:12s} {'XLA' if jit else 'graph':5s} "
                      f"{time.perf_counter() - start:6.1f} s", file=sys.stderr)
                variants[name, policy, jit] = (model, data)

    times = {key: [] for key in variants}
    cpu_times = {key: [] for key in variants}
    gc.collect()
    gc.disable()  # no collection pauses inside timed steps
    try:
        for _ in range(_ROUNDS.value):
            for key, (model, data) in variants.items():
                for _ in range(_STEPS.value):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    model.train_on_batch(*data)
                    times[key].append(time.perf_counter() - start)
                    cpu_times[key].append(time.process_time() - cpu_start)
    finally:
        gc.enable()
    median = {key: float(np.median(values)) for key, values in times.items()}
    cpu = {key: float(np.median(values)) for key, values in cpu_times.items()}

    header = f"{'model':11s}  {'policy':12s}"
    for mode in ["", "XLA "][:len(modes)]:
        header += (f"  {mode + 'ms/step':>11s}  {'x f32':>6s}"
                   f"  {mode + 'CPU ms':>10s}  {'x f32':>6s}")
    print(header)
    print("-" * len(header))
    for name in _MODELS.value:
        for policy in policies:
            row, timed = f"{name:11s}  {policy:12s}", False
            for jit in modes:
                key, baseline = (name, policy, jit), (name, "float32", jit)
                if key in times and baseline in times:
                    timed = True
                    row += (f"  {median[key] * 1e3:11.1f}  {median[key] / median[baseline]:6.2f}"
                            f"  {cpu[key] * 1e3:10.1f}  {cpu[key] / cpu[baseline]:6.2f}")
                else:
                    row += f"  {'-':>11s}  {'-':>6s}  {'-':>10s}  {'-':>6s}"
            if timed:
                print(row)
    print("medians over the timed steps; x f32: ratio to the float32 row of the same model "
          "and column")
    print(f"load average after: {machine.load_average()}")


if __name__ == "__main__":
    program.run(main)
