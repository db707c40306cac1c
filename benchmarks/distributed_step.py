"""Training-step time with the gradient all-reduce emulated, per replica count.

For 1, 2 and 4 replicas (`tf.distribute.MirroredStrategy` over logical CPU devices of
this one CPU), times `model.train_on_batch` of an HFP8 model (`tfhfp8.quantize_model(
model, "hfp8")`) with the same global batch, three ways:

- `keras`:  Keras' own all-reduce in FP32 (`tf.distribute.ReductionToOneDevice`: the
            strategies of several sizes in one process cannot all use collective ops,
            whose keys restart with every strategy): the baseline.
- `fp32`:   `tfhfp8.distribute.GradientCommunication("float32")`: every replica
            gathers all gradients and sums them in the emulated ring in FP32.
- `e5m2`:   the same ring in 1-5-2 (every send and partial sum rounded).

Every variant is built and warmed up first; each timed round then runs every variant
in turn, so that a slow spell of this shared machine hits all alike. The table gives
the median wall-clock time of a step and its ratio to `keras` with the same replica
count, and the same for the process's CPU time. The replicas share the same cores,
so the step time does not fall with more replicas here: the ratios show what the
emulation adds (the gather of N gradients and the emulated sums, computed on every
replica). Compare ratios from one run, never absolute times across runs.

    PYTHONPATH=. python benchmarks/distributed_step.py [--model=small_cnn] [--replicas=1,2,4]

Prints a table; asserts nothing.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_string("model", "small_cnn", "A tfhfp8.models builder (28x28x1 input).")
_REPLICAS = flags.DEFINE_list("replicas", "1,2,4", "Replica counts.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps of each variant first.",
                               lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timed rounds (1 step each).",
                               lower_bound=1)
VARIANTS = ("keras", "fp32", "e5m2")


def main(argv):
    del argv
    counts = [int(n) for n in _REPLICAS.value]
    from tfhfp8 import experiment

    experiment.logical_cpus(max(counts))  # before TensorFlow sets up its devices
    import keras
    import tensorflow as tf

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import machine  # benchmarks/machine.py
    import tfhfp8

    print(machine.describe())
    load_before = machine.load_average()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(_BATCH_SIZE.value, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=_BATCH_SIZE.value)
    cases = {}
    for n in counts:
        strategy = tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(n)],
            cross_device_ops=tf.distribute.ReductionToOneDevice())
        for variant in VARIANTS:
            keras.utils.set_random_seed(0)
            with strategy.scope():
                base = tfhfp8.models.get(_MODEL.value, input_shape=(28, 28, 1), num_classes=10)
                model = tfhfp8.quantize_model(base, "hfp8")
                optimizer = keras.optimizers.SGD(0.01)
                if variant != "keras":
                    optimizer = tfhfp8.distribute.GradientCommunicationOptimizer(
                        optimizer, "float32" if variant == "fp32" else "float8_e5m2")
                model.compile(optimizer, "sparse_categorical_crossentropy")
            for _ in range(_WARMUP.value):
                model.train_on_batch(x, y)
            cases[(n, variant)] = (model, [], [])
    for _ in range(_ROUNDS.value):
        for model, walls, cpus in cases.values():
            wall, cpu = time.perf_counter(), time.process_time()
            model.train_on_batch(x, y)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    print(f"\nmodel {_MODEL.value}, hfp8, global batch {_BATCH_SIZE.value}; median of "
          f"{_ROUNDS.value} interleaved steps after {_WARMUP.value} warm-up steps")
    print(f"{'replicas':>8} {'all-reduce':<12} {'ms/step':>9} {'x keras':>8} "
          f"{'CPU ms':>9} {'x keras':>8}")
    for n in counts:
        base_wall = np.median(cases[(n, "keras")][1])
        base_cpu = np.median(cases[(n, "keras")][2])
        for variant in VARIANTS:
            wall, cpu = np.median(cases[(n, variant)][1]), np.median(cases[(n, variant)][2])
            print(f"{n:>8} {variant:<12} {1000 * wall:>9.1f} {wall / base_wall:>8.2f} "
                  f"{1000 * cpu:>9.1f} {cpu / base_cpu:>8.2f}")
    print(f"(load average before: {load_before}; after: {machine.load_average()})")


if __name__ == "__main__":
    app.run(main)
