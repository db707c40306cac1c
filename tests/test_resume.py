"""A training run resumed from a saved model is bit-identical to the uninterrupted run.

Stochastic rounding draws its seeds from checkpointed state (each emulated layer's
rounding step counter), not from TF's global random state, so that with
`tf.config.experimental.enable_op_determinism()` training 2 epochs, saving, loading in a
new process and training 2 more gives exactly the losses and predictions of 4 epochs in
one go. Each run is a separate process: nothing of the first survives in the second.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfhfp8

_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, keras, tensorflow as tf, tfhfp8

    mode, path, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(1)
    (x, y), (x_test, _) = tfhfp8.datasets.digits()
    x, y = x[:384], y[:384]
    if mode == "resume":
        model = keras.saving.load_model(path)
        start = int(model.optimizer.iterations.numpy()) // 6
    else:
        model = keras.Sequential([
            keras.Input((8, 8, 1)),
            tfhfp8.layers.Conv2D(4, 3, activation="relu", policy="fp8"),
            keras.layers.Flatten(),
            tfhfp8.layers.Dense(16, activation="relu", policy="fp8"),
            tfhfp8.layers.Dense(10, policy="fp8"),
        ])
        model.compile(keras.optimizers.Adam(3e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        start = 0
    history = model.fit(x, y, batch_size=64, epochs=start + epochs, initial_epoch=start,
                        shuffle=False, verbose=0)
    if mode == "first":
        model.save(path)
    steps = [int(layer._rounding_step_holder.variable.numpy())
             for layer in model.layers if hasattr(layer, "_rounding_step_holder")]
    print(json.dumps({"loss": [float(v).hex() for v in history.history["loss"]],
                      "predictions": model.predict(x_test[:64], verbose=0).tolist(),
                      "steps": steps}))
""")


def _run(tmp_path, *args):
    result = subprocess.run([sys.executable, "-c", _SCRIPT, *args], capture_output=True,
                            text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_resumed_run_is_bit_identical_to_the_uninterrupted_one(tmp_path):
    path = str(tmp_path / "fp8.keras")
    whole = _run(tmp_path, "whole", path, "4")
    first = _run(tmp_path, "first", path, "2")
    resumed = _run(tmp_path, "resume", path, "2")
    assert first["loss"] == whole["loss"][:2]
    assert resumed["loss"] == whole["loss"][2:]  # epochs 3 and 4, to the last bit
    assert resumed["predictions"] == whole["predictions"]
    assert resumed["steps"] == whole["steps"] == [4 * 6] * 3  # 6 steps per epoch


def test_rounding_step_counter_is_saved_but_is_not_a_weight(tmp_path):
    layer = tfhfp8.layers.Dense(3, policy="fp8")
    model = keras.Sequential([keras.Input((4,)), layer])
    assert len(layer.weights) == 2 and len(model.get_weights()) == 2  # kernel, bias only
    model(np.ones((2, 4), "float32"))
    layer._rounding_step_holder.variable.assign(41)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert int(loaded.layers[0]._rounding_step_holder.variable.numpy()) == 41
    # No stochastic role: no counter (and files without one load with it at 0).
    assert not hasattr(tfhfp8.layers.Dense(3, policy="hfp8"), "_rounding_step_holder")


def test_model_saved_before_the_counter_existed_loads_and_trains():
    # Saved by main at 68b72e5 (before the counter) with TF 2.18.1 + Keras 3.9.0, the oldest
    # supported versions: an fp8 model after 3 training steps.
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    model = keras.saving.load_model(os.path.join(data, "legacy_fp8_mlp.keras"))
    expected = np.load(os.path.join(data, "legacy_fp8_mlp.npz"))
    np.testing.assert_array_equal(model.predict(expected["x"], verbose=0), expected["y"])
    counters = [layer._rounding_step_holder.variable for layer in model.layers]
    assert [int(c.numpy()) for c in counters] == [0, 0]
    model.fit(expected["x"], expected["labels"], epochs=1, batch_size=8, verbose=0)
    assert [int(c.numpy()) for c in counters] == [3, 3]


@pytest.mark.parametrize("layer", ["Dense", "Embedding"])
def test_stochastic_seeds_differ_between_steps_and_layers(layer):
    policy = tfhfp8.Policy("fp8", weights="float8_e5m2",
                           rounding={"weights": "stochastic"})
    make = (lambda: tfhfp8.layers.Dense(64, policy=policy)) if layer == "Dense" else (
        lambda: tfhfp8.layers.Embedding(8, 64, policy=policy))
    x = np.full((1, 8), 0.3, "float32") if layer == "Dense" else np.arange(8)[None]
    a, b = make(), make()
    a(x), b(x)
    b.set_weights(a.get_weights())
    first, second = a(x).numpy(), a(x).numpy()
    assert not np.array_equal(first, second)  # a new step, new rounding
    assert not np.array_equal(b(x).numpy(), first)  # another layer, other seeds


# -- tf.train.Checkpoint and BackupAndRestore -------------------------------------------
# The hfp8 recipe with every piece of stochastic-rounding state at work: the layers'
# counters (stochastic errors and master weights), the per-layer adaptive loss scales and
# LowPrecisionOptimizer's stochastic optimizer-state rounding (seeded by the optimizer's steps).
_RECIPE = tfhfp8.Policy("hfp8", loss_scaling="adaptive", rounding={
    "errors": "stochastic", "master_weights": "stochastic"})
_STATES = tfhfp8.Policy(optimizer_states="float16", rounding={"optimizer_states": "stochastic"})


def _recipe_model(seed):
    keras.utils.set_random_seed(seed)
    # Named: the seeds hash the layer's name (a second model of the same process would
    # otherwise get "dense_3", ..., as a new process would not).
    model = tfhfp8.quantize_model(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu", name="first"),
        keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="last")]), _RECIPE)
    model.compile(tfhfp8.optimizers.LowPrecisionOptimizer(keras.optimizers.SGD(0.1, momentum=0.9),
                                                 _STATES),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    return model


def _recipe_data():
    (x, y), _ = tfhfp8.datasets.digits()
    return x[:96], y[:96]  # 3 steps of 32 an epoch


def _counters(model):
    return [int(layer._rounding_step_holder.variable.numpy()) for layer in model.layers
            if hasattr(layer, "_rounding_step_holder")]


def _state_of(model):
    """Weights, optimizer variables, rounding counters and loss-scaling state."""
    layers = [layer for layer in model.layers if hasattr(layer, "emulation_variables")]
    return ([v.numpy() for v in model.weights + model.optimizer.variables]
            + [np.array(c) for c in _counters(model)]
            + [v.numpy() for layer in layers for v in layer.emulation_variables()])


@pytest.fixture(scope="module")
def uninterrupted():
    """The state after 2 epochs (6 steps) in one go."""
    x, y = _recipe_data()
    whole = _recipe_model(seed=1)
    whole.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert _counters(whole) == [6, 6, 6]  # every layer rounds stochastically
    return _state_of(whole)


def test_tf_train_checkpoint_resumes_stochastic_rounding_bit_for_bit(tmp_path,
                                                                      uninterrupted):
    x, y = _recipe_data()

    first = _recipe_model(seed=1)
    first.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).write(
        str(tmp_path / "ckpt"))
    resumed = _recipe_model(seed=7)  # other initial weights: all must come from the file
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(
        path).assert_consumed()
    assert _counters(resumed) == [3, 3, 3]
    resumed.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(uninterrupted, _state_of(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_stochastic_rounding_bit_for_bit(tmp_path,
                                                                    uninterrupted):
    # BackupAndRestore saves .weights.h5 files, which hold the counters (as .keras do).
    x, y = _recipe_data()

    backup = str(tmp_path / "backup")
    interrupted = _recipe_model(seed=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                        callbacks=[keras.callbacks.BackupAndRestore(backup), _Interrupt()])
    resumed = _recipe_model(seed=7)
    resumed.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert int(resumed.optimizer.iterations.numpy()) == 6
    for a, b in zip(uninterrupted, _state_of(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_stochastic_accumulation_rounds_from_the_checkpointed_counter(tmp_path):
    # Only the sums round stochastically: the layer still keeps a counter (not TF's
    # random state), so a restored layer sums as the original one does.
    policy = tfhfp8.Policy("bfloat16", accumulation=tfhfp8.Accumulator(
        "bfloat16", rounding="stochastic"))
    x = np.random.default_rng(3).normal(size=(4, 64)).astype("float32")
    a = tfhfp8.layers.Dense(8, policy=policy, name="summing")
    first = a(x).numpy()
    assert not np.array_equal(a(x).numpy(), first)  # a new step, new rounding
    path = tf.train.Checkpoint(layer=a).write(str(tmp_path / "ckpt"))
    b = tfhfp8.layers.Dense(8, policy=policy, name="summing")
    b(x)
    tf.train.Checkpoint(layer=b).read(path).assert_consumed()
    assert int(b._rounding_step_holder.variable.numpy()) == 2
    np.testing.assert_array_equal(b(x).numpy(), a(x).numpy())
