r"""Distributed HFP8 training with the gradient all-reduce in FP32/FP16/BF16/1-5-2.

    .venv/bin/python -m models.distributed \
        --json docs/results/distributed_communication.json
    .venv/bin/python -m models.distributed \
        --from_json docs/results/distributed_communication.json   # the table only

For each seed, one ResNet-20 (`tfhfp8.models.resnet20`) is initialised, converted to
`tfhfp8.Policy("hfp8", loss_scaling="adaptive")` and trained from those same initial
weights, with the same batches, once per communication (`--communications`,
`tfhfp8.distribute` presets):

- `float32`:            the gradients summed in a ring in FP32 (every partial sum
                        rounded to float32; Keras' own all-reduce is not used).
- `float16`, `bfloat16`: the same ring in FP16 / BF16.
- `float8_e5m2`:        the ring in 1-5-2 (each replica's gradient and every partial sum
                        rounded to 1-5-2, nearest even, saturating).
- `float8_e5m2_scaled`: 1-5-2 with a power-of-two per-tensor scale agreed across
                        replicas from the global max |g| (`scaling="absmax"`).

with `--replicas` replicas (MirroredStrategy over logical CPU devices) and SGD with
momentum. Reported: test accuracy (mean and per seed), its difference from `float32`
communication, the final training loss, and what the communication does to the
gradients of one batch of the trained model: the relative L2 error of the
communicated sum against the exact sum, and the fraction of non-zero exact sums that
came out as zero (underflow).
"""

import json
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from tfhfp8 import experiment  # noqa: E402

_COMMUNICATIONS = flags.DEFINE_list(
    "communications", "float32,float16,bfloat16,float8_e5m2,float8_e5m2_scaled",
    "tfhfp8.distribute presets to compare.")
_REPLICAS = flags.DEFINE_integer("replicas", 4, "Data-parallel replicas (logical CPUs).")
_SEEDS = flags.DEFINE_list("seeds", "0,1,2", "Seeds (initial weights, shuffling).")
_LIMIT = flags.DEFINE_integer("limit", 60000, "Fashion-MNIST training examples (first N).")
_TEST_LIMIT = flags.DEFINE_integer("test_limit", 10000, "Test examples (first N).")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Training epochs per run.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.05, "SGD learning rate.")
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
_POLICY = flags.DEFINE_string("policy", "hfp8", "Compute policy preset.")
_JSON = flags.DEFINE_string("json", "distributed_communication.json",
                            "Where to write the results (per seed).")
_FROM_JSON = flags.DEFINE_string("from_json", None,
                                 "Train nothing: print the table of this results file.")


def run_one(communication, seed, data, model_kwargs):
    import keras

    import tfhfp8

    (x_train, y_train), (x_test, y_test) = data
    strategy = experiment.strategy_for(_REPLICAS.value)
    keras.utils.set_random_seed(seed)
    base = tfhfp8.models.get("resnet20", **model_kwargs)
    with strategy.scope():
        model = tfhfp8.quantize_model(base, tfhfp8.Policy(_POLICY.value,
                                                          loss_scaling="adaptive"))
        optimizer = keras.optimizers.SGD(_LEARNING_RATE.value, momentum=_MOMENTUM.value)
        model.compile(experiment.compile_args(optimizer, communication),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value,
                        verbose=0)
    seconds = time.perf_counter() - start
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    return dict(test_accuracy=float(accuracy), test_loss=float(loss),
                train_loss=[float(v) for v in history.history["loss"]],
                seconds=float(seconds),
                **gradient_error(model, strategy, communication, x_train, y_train))


def gradient_error(model, strategy, communication, x, y):
    """What the communication does to one batch's gradients of the trained model: the
    relative L2 error of the communicated sum against the exact sum (float64), and the
    fraction of non-zero exact sums that came out as zero."""
    import tensorflow as tf

    from tfhfp8 import distribute

    batch = _BATCH_SIZE.value
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(
        reduction="sum_over_batch_size")
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x[:batch], y[:batch])).batch(batch))

    @tf.function
    def gradients(inputs):
        def replica(data):
            with tf.GradientTape() as tape:
                loss = loss_fn(data[1], model(data[0], training=True)) / (
                    strategy.num_replicas_in_sync)
            return tape.gradient(loss, model.trainable_variables)
        return strategy.run(replica, args=(inputs,))

    per_replica = gradients(next(iter(dataset)))
    stacked = [np.stack([v.numpy() for v in strategy.experimental_local_results(g)])
               for g in per_replica]
    reduced = distribute.get(communication).reduce(stacked)
    exact = np.concatenate([s.astype(np.float64).sum(axis=0).ravel() for s in stacked])
    got = np.concatenate([r.numpy().astype(np.float64).ravel() for r in reduced])
    nonzero = exact != 0
    return dict(gradient_relative_error=float(np.linalg.norm(got - exact)
                                              / np.linalg.norm(exact)),
                gradient_zeroed=float(np.mean(got[nonzero] == 0)))


def table(results):
    runs = results["runs"]
    reference = np.mean([r["test_accuracy"] for r in runs.get("float32", {}).values()] or [0])
    lines = [f"{'communication':<20} {'test acc (mean ± sd)':>20} {'vs float32':>11} "
             f"{'per seed':>24} {'train loss':>10} {'grad rel err':>12} {'zeroed':>8}"]
    for name, per_seed in runs.items():
        acc = [r["test_accuracy"] for r in per_seed.values()]
        loss = np.mean([r["train_loss"][-1] for r in per_seed.values()])
        seeds = " ".join(f"{100 * a:.2f}" for a in acc)
        error = np.mean([r["gradient_relative_error"] for r in per_seed.values()])
        zeroed = np.mean([r["gradient_zeroed"] for r in per_seed.values()])
        spread = 100 * np.std(acc, ddof=1) if len(acc) > 1 else 0.0
        lines.append(f"{name:<20} {100 * np.mean(acc):>11.2f} ± {spread:4.2f}% "
                     f"{100 * (np.mean(acc) - reference):>+8.2f} pt {seeds:>24} {loss:>10.4f} "
                     f"{error:>12.2e} {100 * zeroed:>7.2f}%")
    return "\n".join(lines)


def main(argv):
    del argv
    if _FROM_JSON.value:
        with open(_FROM_JSON.value) as file:
            print(table(json.load(file)))
        return
    experiment.logical_cpus(_REPLICAS.value)  # before TensorFlow sets up its devices
    from tfhfp8 import distribute

    for name in _COMMUNICATIONS.value:
        distribute.get(name)  # bad names fail now, not after an hour of training
    experiment.check_writable_dir(os.path.dirname(os.path.abspath(_JSON.value)), "json")
    (x_train, y_train), (x_test, y_test), model_kwargs = experiment.load_data(
        "fashion_mnist", _LIMIT.value, _TEST_LIMIT.value)
    results = {"config": dict(model="resnet20", dataset="fashion_mnist",
                              policy=f"{_POLICY.value} + adaptive per-layer loss scaling",
                              replicas=_REPLICAS.value, epochs=_EPOCHS.value,
                              batch_size=_BATCH_SIZE.value,
                              optimizer=f"SGD(lr={_LEARNING_RATE.value}, "
                                        f"momentum={_MOMENTUM.value})",
                              train_examples=int(len(x_train)),
                              test_examples=int(len(x_test)),
                              algorithm="ring", rounding="nearest_even"),
               "runs": {}}
    for seed in map(int, _SEEDS.value):
        for name in _COMMUNICATIONS.value:
            row = run_one(name, seed, ((x_train, y_train), (x_test, y_test)), model_kwargs)
            results["runs"].setdefault(name, {})[str(seed)] = row
            print(f"{name} seed {seed}: test accuracy {100 * row['test_accuracy']:.2f}%, "
                  f"{row['seconds']:.0f} s", flush=True)
            with open(_JSON.value, "w") as file:  # after every run: nothing is lost
                json.dump(results, file, indent=2)
    print(table(results))


if __name__ == "__main__":
    app.run(main)
