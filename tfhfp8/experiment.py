"""The main job: train one model under several policies and compare them with FP32.

>>> from tfhfp8 import experiment
>>> results = experiment.train_policies(  # doctest: +SKIP
...     "small_cnn", "digits", ["float32", "hfp8"], epochs=1, output_dir="out")
"""

import contextlib
import json
import math
import numbers
import os
import tempfile
import time

import keras
import numpy as np

from tfhfp8 import datasets, distribute, models, optimizers
from tfhfp8 import loss_scaling as loss_scaling_lib
from tfhfp8 import policy as policy_lib
from tfhfp8.conversion import quantize_model
from tfhfp8.loss_scaling import DynamicLossScaleOptimizer

# Per-layer rules (tfhfp8.loss_scaling) and whole-model dynamic scaling (optimizers).
LOSS_SCALINGS = ("none", *loss_scaling_lib.names(), "dynamic", "enhanced")
LEARNING_RATE_SCHEDULES = ("constant", "cosine")


def _check_positive_int(name, value, none=False):
    if none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if none else ''}, "
                         f"got {value!r}")


def check_writable_dir(path, name="output_dir"):
    """Creates folder `path` if needed and checks that a file can be written in it; a
    ValueError naming `name` otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{name}: cannot write in {path!r} ({error.strerror or error})"
                         ) from None


def load_model_file(path, name="model"):
    """The Keras model saved at `path` (.keras or legacy .h5), uncompiled; a ValueError
    naming `name` and the file when it is missing, damaged (truncated) or no model."""
    import zipfile  # noqa: PLC0415

    import h5py  # noqa: PLC0415 (a Keras dependency)

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file {path!r}")
    if not (zipfile.is_zipfile(path) if path.endswith(".keras")
            else _opens_as_hdf5(path, h5py) if path.endswith(".h5") else True):
        raise ValueError(f"{name}: cannot load {path!r}: the file is damaged (truncated, "
                         f"or not a complete {os.path.splitext(path)[1]} file); save the "
                         "model again")
    if path.endswith(".weights.h5"):
        raise ValueError(f"{name}: {path!r} holds weights only (model.save_weights), not a "
                         "model: save the whole model with model.save('name.keras')")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many kinds for a file that is not a model
        damaged = isinstance(error, (OSError, EOFError, zipfile.BadZipFile))
        raise ValueError(f"{name}: cannot load {path!r} as a Keras model"
                         f"{' (the file is damaged)' if damaged else ''}: "
                         f"{type(error).__name__}: {error}") from None


def _opens_as_hdf5(path, h5py):
    try:
        with h5py.File(path, "r"):
            return True
    except OSError:  # truncated, or not HDF5 at all
        return False


# The reference models that take token ids, and the data sets of token ids.
_TEXT_MODELS = ("transformer_classifier",)
_TEXT_DATASETS = ("rotten_tomatoes",)


def _check_model_takes(model, dataset):
    """A ValueError when a reference model cannot take the data set (images or tokens)."""
    if not isinstance(model, str) or not isinstance(dataset, str):
        return
    text = model in _TEXT_MODELS
    if text != (dataset in _TEXT_DATASETS):
        fitting = [d for d in datasets.names() if (d in _TEXT_DATASETS) == text]
        kind = "token ids" if text else "images"
        raise ValueError(f"model {model!r} takes {kind}: dataset must be one of "
                         f"{', '.join(fitting)}; got {dataset!r}")


def load_data(dataset, limit=None, test_limit=None, seed=0):
    """`(x_train, y_train), (x_test, y_test), model_kwargs` for a data set name."""
    kwargs = {}
    if dataset == "fashion_mnist":
        kwargs = dict(limit=limit, test_limit=test_limit)
    elif dataset in ("digits", "mnist_5k", "rotten_tomatoes"):
        kwargs = dict(seed=seed)
    loaded = datasets.load(dataset, **kwargs)
    (x_train, y_train), (x_test, y_test) = loaded[:2]
    x_train, y_train = x_train[:limit], y_train[:limit]
    x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if dataset == "rotten_tomatoes":
        model_kwargs = dict(vocab_size=len(loaded[2]), sequence_length=x_train.shape[1],
                            num_classes=num_classes)
    else:
        model_kwargs = dict(input_shape=x_train.shape[1:], num_classes=num_classes)
    return (x_train, y_train), (x_test, y_test), model_kwargs


def logical_cpus(replicas):
    """Names of `replicas` CPU devices for a `tf.distribute.MirroredStrategy` on one CPU.

    Splits the first physical CPU into `replicas` logical devices (TensorFlow allows
    this only before its runtime starts: a RuntimeError saying so otherwise); a
    process whose CPU is already split into at least as many keeps its split.
    """
    _check_positive_int("replicas", replicas)
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if replicas > 1 and (current is None or len(current) < replicas):
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
        except RuntimeError as error:
            raise RuntimeError(
                f"replicas={replicas}: TensorFlow's devices are already set up in this "
                f"process ({error}); split the CPU before anything runs on it, e.g. "
                "call tfhfp8.experiment.logical_cpus first") from None
    return [f"/cpu:{i}" for i in range(replicas)]


def strategy_for(replicas):
    """A MirroredStrategy over `replicas` logical CPU devices (None for one replica)."""
    if replicas == 1:
        return None
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(logical_cpus(replicas))


def compile_args(optimizer, gradient_communication=None):
    """The optimizer, wrapped to communicate gradients in `gradient_communication`."""
    if gradient_communication is None:
        return optimizer
    return distribute.GradientCommunicationOptimizer(optimizer, gradient_communication)


def with_loss_scaling(policy, loss_scaling):
    """`policy` with the per-layer loss scaling `loss_scaling` (a name of
    `tfhfp8.loss_scaling.names()`) if it quantizes errors; else `policy` itself (also
    for the whole-model scalings `"none"`, `"dynamic"`, `"enhanced"`)."""
    if loss_scaling not in loss_scaling_lib.names() or policy.errors is None:
        return policy
    config = policy.get_config()
    config["loss_scaling"] = loss_scaling
    return policy_lib.Policy.from_config(config)


def make_optimizer(learning_rate, loss_scaling, policy=None):
    """The Adam optimizer of the experiments: wrapped in `LowPrecisionOptimizer` when
    `policy` keeps optimizer states in low precision (or Kahan-sums its master
    weights), then in whole-model loss scaling for `loss_scaling` `"dynamic"` (Keras)
    or `"enhanced"` (`DynamicLossScaleOptimizer` with a floor of 2^8)."""
    optimizer = keras.optimizers.Adam(learning_rate)
    if policy is not None and (policy.optimizer_states is not None
                               or policy.rounding["master_weights"] == "kahan"):
        # The optimizer keeps its state (and then every weight) in the policy's formats.
        optimizer = optimizers.LowPrecisionOptimizer(optimizer, policy)
    if loss_scaling == "dynamic":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    if loss_scaling == "enhanced":
        return DynamicLossScaleOptimizer(optimizer, min_scale=2.0**8)
    return optimizer


def _check_arguments(loss_scaling, epochs, batch_size, limit, test_limit, seed,
                     learning_rate, replicas, learning_rate_schedule):
    if loss_scaling not in LOSS_SCALINGS:
        raise ValueError(f"loss_scaling must be one of {LOSS_SCALINGS}, got {loss_scaling!r}")
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("limit", limit, none=True)
    _check_positive_int("test_limit", test_limit, none=True)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if (isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real)
            or not 0 < learning_rate < math.inf):
        raise ValueError(f"learning_rate must be a positive finite number, got "
                         f"{learning_rate!r}")
    _check_positive_int("replicas", replicas)
    if batch_size % replicas:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of replicas "
                         f"({replicas}): each replica takes batch_size / replicas examples")
    if learning_rate_schedule not in LEARNING_RATE_SCHEDULES:
        raise ValueError(f"learning_rate_schedule must be one of {LEARNING_RATE_SCHEDULES}, "
                         f"got {learning_rate_schedule!r}")


def _policies(model, dataset, policies):
    """The policies as Policy objects, after checking the model and data-set names."""
    if isinstance(policies, (str, policy_lib.Policy)):
        policies = [policies]
    policies = [policy_lib.get(p) for p in policies]
    if not policies:
        raise ValueError("policies is empty: name at least one policy")
    if isinstance(model, str) and model not in models.names():
        raise ValueError(f"model must be one of {', '.join(models.names())}; got {model!r}")
    if isinstance(dataset, str) and dataset not in datasets.names():
        raise ValueError(f"dataset must be one of {', '.join(datasets.names())}; got "
                         f"{dataset!r}")
    _check_model_takes(model, dataset)
    return policies


def _train_one(base, policy, data, rate, config, gradient_communication, strategy, verbose):
    """Trains a copy of `base` under `policy`; its entry of the results."""
    (x_train, y_train), (x_test, y_test) = data
    loss_scaling, seed = config["loss_scaling"], config["seed"]
    # Before the copy too: its Dropout layers draw their seeds when built, so that every
    # policy gets the same dropout masks, wherever it stands in the list.
    keras.utils.set_random_seed(seed)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        emulated = quantize_model(base, with_loss_scaling(policy, loss_scaling))
        emulated.compile(compile_args(make_optimizer(rate, loss_scaling, policy),
                                      gradient_communication),
                         "sparse_categorical_crossentropy", metrics=["accuracy"])
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    history = emulated.fit(x_train, y_train, epochs=config["epochs"],
                           batch_size=config["batch_size"],
                           validation_data=(x_test, y_test), verbose=verbose)
    seconds = time.perf_counter() - start
    test_loss, test_accuracy = emulated.evaluate(x_test, y_test, batch_size=512, verbose=0)
    return dict(
        test_accuracy=float(test_accuracy), test_loss=float(test_loss),
        seconds=float(seconds),
        history={k: [float(v) for v in values] for k, values in history.history.items()})


def train_policies(model, dataset, policies, epochs=1, batch_size=128, loss_scaling="adaptive",
                   seed=0, output_dir=None, limit=None, test_limit=None, learning_rate=1e-3,
                   verbose=1, replicas=1, gradient_communication=None,
                   learning_rate_schedule="constant"):
    """Trains `model` on `dataset` once per policy, from the same initial weights.

    Args:
      model: a builder name of `tfhfp8.models`.
      dataset: a loader name of `tfhfp8.datasets`.
      policies: policy preset names (or Policy objects).
      loss_scaling: `"none"`, per-layer `"adaptive"` or `"absmax"` (set on every policy
        that quantizes errors), or whole-model `"dynamic"` (Keras) or `"enhanced"`
        (`DynamicLossScaleOptimizer` with a floor of 2^8).
      seed: seeds the initial weights, the shuffling and the data split.
      output_dir: where `results.json` and `curves.png` go (None: nowhere).
      limit, test_limit: use only the first examples of each split (positive).
      learning_rate_schedule: `"constant"`, or `"cosine"` (decays to 0 over the run;
        `keras.optimizers.schedules.CosineDecay`): the last epoch's accuracy then
        settles instead of swinging with every step of a constant rate.
      replicas: data-parallel replicas (`tf.distribute.MirroredStrategy` over that
        many logical CPU devices, `logical_cpus`); `batch_size` is the global batch.
      gradient_communication: None (Keras' FP32 all-reduce), or the format (a
        `tfhfp8.distribute` preset name, config or `GradientCommunication`) the
        gradients are all-reduced in (`GradientCommunicationOptimizer`).

    Every argument is checked (and `output_dir` created and tried) before any training.

    Returns:
      `{"config": {...}, "policies": {name: {"test_accuracy", "test_loss", "seconds",
      "history": {"loss", "accuracy", "val_loss", "val_accuracy"}}}}`.
    """
    _check_arguments(loss_scaling, epochs, batch_size, limit, test_limit, seed,
                     learning_rate, replicas, learning_rate_schedule)
    if gradient_communication is not None:
        gradient_communication = distribute.get(gradient_communication)
    strategy = strategy_for(replicas)
    policies = _policies(model, dataset, policies)
    if output_dir:  # before the training, whose results would be lost
        check_writable_dir(output_dir, "output_dir")
    (x_train, y_train), (x_test, y_test), model_kwargs = load_data(
        dataset, limit, test_limit, seed)
    keras.utils.set_random_seed(seed)
    base = models.get(model, **model_kwargs)
    config = dict(model=model, dataset=dataset, epochs=epochs, batch_size=batch_size,
                  loss_scaling=loss_scaling, seed=seed, learning_rate=learning_rate,
                  train_examples=int(len(x_train)), test_examples=int(len(x_test)),
                  parameters=int(base.count_params()), replicas=replicas)
    rate = learning_rate
    if learning_rate_schedule != "constant":  # configs of constant-rate runs stay as they were
        config["learning_rate_schedule"] = learning_rate_schedule
        # A schedule is stateless (a function of the optimizer's step): one serves every run.
        rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, epochs * math.ceil(len(x_train) / batch_size))
    if gradient_communication is not None:
        config["gradient_communication"] = distribute.serialize(gradient_communication)
    results = {"config": config, "policies": {}}
    for policy in policies:
        if verbose:
            print(f"\n== {policy.name}: {model} on {dataset}, {epochs} epoch(s)", flush=True)
        results["policies"][policy.name] = _train_one(
            base, policy, ((x_train, y_train), (x_test, y_test)), rate, config,
            gradient_communication, strategy, verbose)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "results.json"), "w") as file:
            json.dump(results, file, indent=2)
        plot_curves(results, os.path.join(output_dir, "curves.png"))
    return results


def table(results):
    """The results as a text table: accuracy, loss, difference from float32, time."""
    rows = results["policies"]
    reference = rows.get("float32", {}).get("test_accuracy")
    width = max([12, *map(len, rows)])
    lines = [f"{'policy':<{width}} {'test acc':>9} {'test loss':>10} {'vs float32':>11} "
             f"{'seconds':>8}"]
    for name, row in rows.items():
        delta = "" if reference is None else f"{100 * (row['test_accuracy'] - reference):+.2f} pt"
        lines.append(f"{name:<{width}} {100 * row['test_accuracy']:>8.2f}% "
                     f"{row['test_loss']:>10.4f} {delta:>11} {row['seconds']:>8.1f}")
    return "\n".join(lines)


def plot_curves(results, path):
    """Test accuracy and training loss per epoch, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    config = results["config"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in results["policies"].items():
        epochs = np.arange(1, len(row["history"]["loss"]) + 1)
        left.plot(epochs, 100 * np.array(row["history"]["val_accuracy"]), marker="o", label=name)
        right.plot(epochs, row["history"]["loss"], marker="o", label=name)
    left.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    right.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{config['model']} on {config['dataset']} "
                    f"(loss scaling: {config['loss_scaling']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
