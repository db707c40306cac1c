"""What a benchmark ran on (the CPU, the library versions, the load average), and the
throughput timing the quantization benchmarks share."""

import os
import pathlib
import platform
import time

import keras
import ml_dtypes
import numpy as np
import tensorflow as tf


def describe():
    """Two lines: the CPU and its usable cores; TensorFlow, Keras, ml_dtypes, NumPy."""
    model, cores = "unknown", os.cpu_count()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    return (f"CPU: {model} ({platform.machine()}), {cores} cores ({usable} usable)\n"
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
            f"ml_dtypes {ml_dtypes.__version__}, NumPy {np.__version__}, intra-op threads "
            f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}")


def load_average():
    """The 1, 5 and 15 minute load averages, as printed by uptime."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def with_env(fn, **env):
    """fn, run with the environment variables `env` set (restored afterwards)."""
    def wrapped():
        old = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for name, value in old.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return wrapped


def test_values(n):
    """The values every quantization benchmark rounds: n float32 normal samples times
    powers of two from 2^-12 to 2^5 (many binades, as tensors in training hold)."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal(n, dtype=np.float32)
            * np.exp2(rng.integers(-12, 6, n)).astype(np.float32))


def copy_floor_cases(x):
    """The memory-copy floor `x * one` as two cases, a tf.function and an XLA-compiled
    one: which is faster varies by machine, and the faster is the floor."""
    one = tf.Variable(1.0, dtype=tf.float32)
    copy = tf.function(lambda v: v * one, autograph=False)
    copy_xla = tf.function(lambda v: v * one, autograph=False, jit_compile=True)
    return [("copy floor: x * one (tf.function)", lambda: copy(x)),
            ("copy floor: x * one (XLA)", lambda: copy_xla(x))]


def print_throughput(cases, n, repeats, warmup):
    """Times `cases` ([(name, fn)], the two copy-floor cases first) on n elements and
    prints ms, elements/s and the ratio to the copy floor per case; returns {name: best
    seconds}.

    Interleaved rounds: each round times every case once, so a slow spell of a shared
    machine hits all cases alike; the best round of each case counts."""
    for _, fn in cases:
        for _ in range(warmup):
            fn()
    best = [float("inf")] * len(cases)
    for _ in range(repeats):
        for j, (_, fn) in enumerate(cases):
            start = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - start)
    copy_rate = n / min(best[:2])
    width = max(len(name) for name, _ in cases)
    print(f"{'case':{width}s}  {'ms':>8s}  {'G elem/s':>8s}  {'x copy':>6s}")
    for (name, _), seconds in zip(cases, best):
        rate = n / seconds
        print(f"{name:{width}s}  {seconds * 1e3:8.2f}  {rate / 1e9:8.3f}  {rate / copy_rate:6.2f}")
    print(f"load average after: {load_average()}")
    return dict(zip((name for name, _ in cases), best))
