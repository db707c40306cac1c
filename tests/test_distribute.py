"""tfhfp8.distribute: the emulated gradient all-reduce, exact against a rational
simulation, under MirroredStrategy on logical CPUs and across two processes."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf

import reference
import tfhfp8
from tfhfp8 import distribute
from tfhfp8.rounding import stochastic_seed

# -- the numpy / fractions simulation (the oracle) ---------------------------------------
def _round(values, spec, saturate=True):
    return [reference.round_value(v, spec, "nearest_even", saturate) for v in values]


def simulate(grads, fmt, algorithm, saturate=True):
    """The documented arithmetic, with exact rational sums and the reference rounding.
    grads: [N, n] float32 numpy. Returns float64 numpy [n]."""
    spec = reference.Spec.of(tfhfp8.formats.get(fmt))
    n_rep, n = grads.shape
    sent = [_round([Fraction(float(v)) for v in grads[r]], spec, saturate) for r in range(n_rep)]
    if algorithm == "ring":
        out = [None] * n
        for c, idx in enumerate(np.array_split(np.arange(n), n_rep)):
            for j in idx:
                acc = sent[(c + 1) % n_rep][j]
                for k in range(1, n_rep):
                    acc = _round([acc + sent[(c + 1 + k) % n_rep][j]], spec, saturate)[0]
                out[j] = acc
    elif algorithm == "tree":
        values = sent
        while len(values) > 1:
            pairs = [_round([a + b for a, b in zip(values[i], values[i + 1])], spec, saturate)
                     for i in range(0, len(values) - 1, 2)]
            values = pairs + ([values[-1]] if len(values) % 2 else [])
        out = values[0]
    else:
        out = _round([sum(col, Fraction(0)) for col in zip(*sent)], spec, saturate)
    return np.array([float(v) for v in out])


def hard_gradients(n_rep, fmt, seed=0, n=40):
    """Gradients whose send and sums underflow, overflow and hit ties of `fmt`."""
    f = tfhfp8.formats.get(fmt)
    rng = np.random.RandomState(seed)
    g = rng.choice(f.values()[np.isfinite(f.values())], size=(n_rep, n)).astype(np.float64)
    g[:, :4] = f.max * 0.75                    # sums overflow (saturate)
    g[:, 4:8] = f.min_subnormal * 0.5          # ties at the bottom: round to 0 (even)
    g[:, 8:12] = f.min_subnormal * 0.75        # underflow candidates
    g[:, 12:16] = 1.0 + f.epsilon / 2          # ties on the send
    g[0, 16:20], g[1:, 16:20] = 1.0, f.epsilon / 2   # ties in the partial sums
    g[:, 20:24] = rng.randn(n_rep, 4) * 1e-3   # plain values
    g *= np.where(rng.rand(n_rep, n) < 0.3, -1.0, 1.0)
    return g.astype(np.float32)


@pytest.mark.parametrize("fmt", ["float8_e5m2", "float16", "bfloat16", "float8_e4m3b11fnuz"])
@pytest.mark.parametrize("algorithm", distribute.ALGORITHMS)
@pytest.mark.parametrize("n_rep", [2, 3, 4])
def test_reduce_matches_rational_simulation(fmt, algorithm, n_rep):
    g = hard_gradients(n_rep, fmt, seed=n_rep)
    comm = distribute.GradientCommunication(fmt, algorithm)
    got = comm.reduce([g])[0].numpy().astype(np.float64)
    np.testing.assert_array_equal(got, simulate(g, fmt, algorithm))


def test_direct_is_exact_only_where_float64_holds_the_sums():
    assert distribute.GradientCommunication("float8_e5m2", "direct").exact_sums(1024)
    assert distribute.GradientCommunication("float16", "direct").exact_sums(4)
    assert not distribute.GradientCommunication("bfloat16", "direct").exact_sums(2)


def test_scaling_keeps_small_gradients_and_is_a_power_of_two():
    g = np.full((4, 3), 2.0**-20, np.float32) * np.array([1.0, 3.0, 0.5], np.float32)
    plain = distribute.GradientCommunication("float8_e5m2").reduce([g])[0].numpy()
    scaled = distribute.GradientCommunication("float8_e5m2", scaling="absmax").reduce([g])[0]
    assert np.all(plain == 0)  # below 1-5-2's smallest subnormal (2^-16) / 2
    # s = 2^floor(log2(57344 / (4 * 3 * 2^-20))): the scaled sum is the exact sum here.
    np.testing.assert_array_equal(scaled.numpy(), 4 * g[0])
    # The oracle with the scale applied by hand, on gradients that need rounding.
    g = hard_gradients(3, "float8_e5m2", seed=7) * np.float32(2.0**-30)
    amax = np.abs(g).max()
    k = int(np.floor(np.log2(57344.0 / (3 * amax))))
    expected = simulate((g.astype(np.float64) * 2.0**k).astype(np.float32), "float8_e5m2",
                        "ring") / 2.0**k
    got = distribute.GradientCommunication("float8_e5m2", scaling="absmax").reduce([g])[0]
    np.testing.assert_array_equal(got.numpy().astype(np.float64), expected)


def test_stochastic_rounding_is_reproducible_and_uses_the_step():
    g = np.random.RandomState(0).randn(3, 500).astype(np.float32) * 0.01
    comm = distribute.GradientCommunication("float8_e5m2", rounding="stochastic")
    step = lambda s: comm.reduce([g], tf.constant(s, tf.int64))[0].numpy()
    np.testing.assert_array_equal(step(3), step(3))
    assert np.any(step(3) != step(4))
    # The oracle: the documented order, rounding with tfhfp8.quantize and the documented
    # seeds (the rounding itself is tested bit for bit in test_stochastic.py).
    import zlib

    seed = lambda step, *key: (step << 32) | zlib.crc32("/".join(map(str, key)).encode())
    assert stochastic_seed(tf.constant(3, tf.int64), "ring", 1).numpy() == \
        seed(3, "ring", 1)
    q = lambda x, *key: tfhfp8.quantize(x, "float8_e5m2", "stochastic", True,
                                        seed(3, *key)).numpy()
    sent = [q(g[r].astype(np.float64), "send", r) for r in range(3)]
    chunk = np.concatenate([np.full(len(c), i) for i, c in
                            enumerate(np.array_split(np.arange(500), 3))])
    j = np.arange(500)
    acc = np.stack(sent)[(chunk + 1) % 3, j]
    for k in (1, 2):
        acc = q(acc + np.stack(sent)[(chunk + 1 + k) % 3, j], "ring", k)
    np.testing.assert_array_equal(step(3), acc.astype(np.float32))


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="algorithm"):
        distribute.GradientCommunication("float16", "butterfly")
    with pytest.raises(ValueError, match="format"):
        distribute.GradientCommunication("int16_dfp")
    with pytest.raises(ValueError, match="format"):
        distribute.GradientCommunication("float7")
    with pytest.raises(ValueError, match="scaling"):
        distribute.GradientCommunication("float16", scaling="max")
    with pytest.raises(ValueError, match="rounding"):
        distribute.GradientCommunication("float16", rounding="up")


def test_serialization_through_the_registry():
    import keras

    for comm in [distribute.get("float8_e5m2"),
                 distribute.GradientCommunication("float32", "tree", "stochastic", "absmax")]:
        config = distribute.serialize(comm)
        assert distribute.get(config) == comm
        assert distribute.get(json.loads(json.dumps(config))) == comm
    assert distribute.serialize(distribute.get("float8_e5m2")) == "float8_e5m2"
    inner = keras.optimizers.SGD(0.1)
    wrapped = distribute.GradientCommunicationOptimizer(inner, "float8_e5m2_scaled")
    again = keras.optimizers.deserialize(keras.optimizers.serialize(wrapped))
    assert again.communication == wrapped.communication
    assert again.inner_optimizer.get_config() == inner.get_config()


# -- under tf.distribute -----------------------------------------------------------------
# Logical CPU devices must be set up before TensorFlow's runtime starts, and a process
# holds one cluster: both run in subprocesses (with timeouts: nothing can hang).
_COMMON = textwrap.dedent("""
    import json, os, sys
    import numpy as np, tensorflow as tf
    import keras, tfhfp8

    def data():
        rng = np.random.default_rng(0)
        x = rng.normal(size=(48, 6)).astype("float32") * 0.05   # small errors: the
        return x, (x[:, :3] @ rng.normal(size=(3, 2))).astype("float32")  # scales rise

    def build(communication, rounding="nearest_even"):
        keras.utils.set_random_seed(1)
        # Named: stochastic-rounding seeds hash the layer's name, and a model rebuilt in
        # the same process would otherwise get new names.
        model = keras.Sequential([keras.Input((6,)),
                                  keras.layers.Dense(8, activation="relu", name="first"),
                                  keras.layers.Dense(8, name="hidden"),
                                  keras.layers.Dense(2, name="last")])
        model = tfhfp8.quantize_model(model, tfhfp8.Policy(
            "hfp8", loss_scaling="adaptive", exempt_first_last=False))
        comm = tfhfp8.distribute.GradientCommunication(communication, rounding=rounding,
                                                       scaling="absmax")
        optimizer = tfhfp8.loss_scaling.DynamicLossScaleOptimizer(
            tfhfp8.distribute.GradientCommunicationOptimizer(keras.optimizers.SGD(0.5), comm),
            initial_scale=1.0)  # per-layer scales do the work
        model.compile(optimizer, "mse")
        return model

    def weights(model):
        return [w.tolist() for w in model.get_weights()]
""")

_MIRRORED = _COMMON + textwrap.dedent("""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
    out = {"all_reduce": {}}
    g = np.array(json.loads(sys.argv[1]), np.float32)   # [4, n]
    for n_rep in (2, 3, 4):
        strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n_rep)])
        for algorithm in ("ring", "tree", "direct"):
            comm = tfhfp8.distribute.GradientCommunication("float8_e5m2", algorithm)

            @tf.function
            def step():
                def replica_fn():
                    r = tf.distribute.get_replica_context().replica_id_in_sync_group
                    return comm.all_reduce([tf.gather(g[:n_rep], r)])[0]
                return strategy.run(replica_fn)

            results = strategy.experimental_local_results(step())
            out["all_reduce"][f"{n_rep}/{algorithm}"] = [r.numpy().tolist() for r in results]

    x, y = data()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build("float8_e5m2")
    out["initial"] = weights(model)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    out["fit"] = weights(model)

    # Interrupted after 3 steps, restored from a checkpoint into a fresh model, resumed:
    # the same weights as 6 uninterrupted steps (stochastic communication: the seeds
    # come from the optimizer's step counter, saved with it).
    def run(steps_before, path=None):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = build("float8_e5m2", "stochastic")
        ds = lambda a, b: tf.data.Dataset.from_tensor_slices((x[a:b], y[a:b])).batch(16)
        model.fit(ds(0, 48), epochs=1, verbose=0)
        if path:
            tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(path)
            with strategy.scope():
                model = build("float8_e5m2", "stochastic")
            model.fit(ds(0, 16), epochs=1, verbose=0)        # builds, then overwritten
            tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(path).expect_partial()
        model.fit(ds(0, 48), epochs=1, verbose=0)
        scales = [float(v.numpy()) for v in model.variables if "loss_scale" in v.path]
        return weights(model), int(model.optimizer.iterations.numpy()), scales

    out["uninterrupted"] = run(3)
    out["resumed"] = run(3, os.path.join(sys.argv[2], "ckpt"))
    print("RESULT " + json.dumps(out))
""")

_WORKER = _COMMON + textwrap.dedent("""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = data()
    with strategy.scope():
        model = build("float8_e5m2")
    tfhfp8.distribute.prepare_multi_worker_fit(model)  # keras-team/keras#20585
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    print("RESULT " + json.dumps({"task": int(os.environ["TASK"]), "fit": weights(model),
                                  "replicas": strategy.num_replicas_in_sync}))
""")


def _result(stdout):
    return json.loads(next(line[7:] for line in stdout.splitlines()
                           if line.startswith("RESULT ")))


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(tfhfp8.__file__)), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


_GRADIENTS = hard_gradients(4, "float8_e5m2", seed=11, n=30)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED, json.dumps(_GRADIENTS.tolist()),
         str(tmp_path_factory.mktemp("ckpt"))],
        capture_output=True, text=True, timeout=400, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return _result(result.stdout)


@pytest.mark.parametrize("n_rep", [2, 3, 4])
def test_all_reduce_under_mirrored_strategy_is_exact_on_every_replica(mirrored, n_rep):
    for algorithm in distribute.ALGORITHMS:
        per_replica = np.array(mirrored["all_reduce"][f"{n_rep}/{algorithm}"])
        assert per_replica.shape[0] == n_rep
        expected = simulate(_GRADIENTS[:n_rep], "float8_e5m2", algorithm)
        for values in per_replica:
            np.testing.assert_array_equal(values, expected, err_msg=algorithm)


def test_checkpoint_resumes_loss_scales_and_communication_rounding(mirrored):
    weights, iterations, scales = mirrored["resumed"]
    assert iterations == 6
    assert mirrored["resumed"] == mirrored["uninterrupted"]
    assert any(s > 1 for s in scales), scales  # the per-layer scales were restored too


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_worker_processes_agree_with_each_other_and_with_one_process(mirrored):
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    workers = [subprocess.Popen(
        [sys.executable, "-c", _WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=_env(TASK=str(i), TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}})))
        for i in range(2)]
    outputs = []
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=300)
            assert worker.returncode == 0, stderr[-3000:]
            outputs.append(_result(stdout))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    assert [o["replicas"] for o in outputs] == [2, 2]
    assert outputs[0]["fit"] == outputs[1]["fit"]
    assert outputs[0]["fit"] == mirrored["fit"]  # the single-process emulation
    assert outputs[0]["fit"] != mirrored["initial"]


def test_wrapped_optimizer_saves_and_reloads_with_the_model(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(distribute.GradientCommunicationOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9), "float8_e5m2_scaled"), "mse")
    x = np.random.RandomState(0).randn(8, 4).astype(np.float32)
    model.fit(x, x[:, :3], batch_size=4, verbose=0)
    # One replica: the gradient itself goes through the communication (Q(s g) / s).
    path = str(tmp_path / "m.keras")
    model.save(path)
    again = keras.saving.load_model(path)
    assert isinstance(again.optimizer, distribute.GradientCommunicationOptimizer)
    assert again.optimizer.communication == distribute.get("float8_e5m2_scaled")
    assert int(again.optimizer.iterations.numpy()) == 2
    for a, b in zip(model.optimizer.variables, again.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    model.fit(x, x[:, :3], batch_size=4, verbose=0)
    again.fit(x, x[:, :3], batch_size=4, verbose=0)
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
