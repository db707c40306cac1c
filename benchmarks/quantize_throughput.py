"""Throughput of tfhfp8's quantization kernels against reference points.

Measures best-of-N elements/s, in one process, for the C++ kernels (each CPU variant
this machine supports) and the TF-ops code under XLA for several formats and each
rounding (`--formats`), the TF-ops backend (graph, eager-fused), `tf.cast`
to float8, the ml_dtypes round trip, dynamic fixed point, the public
`tfhfp8.quantize` path, and the memory-copy floor (`x * one`, the faster of a
`tf.function` and an XLA-compiled one). Each is also given as a ratio to the copy floor: the machine is shared and noisy, so
compare ratios from one run, never absolute times across runs. Then the peak memory
that one eager `tfhfp8.quantize` of a 256 MiB tensor adds, per backend (each in a
fresh process), as a multiple of the input's size.

    PYTHONPATH=. python benchmarks/quantize_throughput.py [--log2_size 24] [--repeats 7]
        [--formats hfp8_fwd,float8_e5m2] [--filter 'x86_64_v3|XLA'] [--nomemory]

Prints three tables (the third: C++ over XLA per format, rounding and CPU variant,
what tfhfp8.ops' per-operation choice is read from); asserts nothing.
"""

import os
import re
import resource
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import tensorflow as tf
from absl import app, flags

import machine  # benchmarks/machine.py
import tfhfp8
from tfhfp8 import program
from tfhfp8.ops import cpp_backend, tf_backend

E4M3FN = tf.as_dtype("float8_e4m3fn")  # not exported as tf.float8_e4m3fn

_LOG2_SIZE = flags.DEFINE_integer("log2_size", 24, "2^this float32 elements.", lower_bound=10)
_REPEATS = flags.DEFINE_integer(
    "repeats", 7, "Timed rounds over all cases; the best round of each case counts.",
    lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls of each case first.", lower_bound=0)
_FILTER = flags.DEFINE_string(
    "filter", "", "Only the cases whose name this regular expression matches, e.g. "
    "'x86_64_v3|XLA' (the copy floor always runs).")
_MEMORY = flags.DEFINE_boolean("memory", True, "Also measure the peak memory (second table).")


_FORMATS = flags.DEFINE_list(
    "formats", ["hfp8_fwd", "float8_e5m2", "float8_e4m3fn", "float16", "bfloat16",
                "float4_e2m1fn"],
    "Formats whose C++ rounding (each CPU variant) and XLA-compiled TF-ops rounding are "
    "timed side by side.")
_ROUNDINGS = [("nearest_even", "RNE"), ("stochastic", "SR"), ("toward_zero", "RZ")]

_MEMORY_CASE = flags.DEFINE_string(
    "memory_case", None, "Internal: measure one case's peak memory in this process.")
_MEMORY_CASES = ["cpp hfp8_fwd RNE", "cpp DFP16 RNE", "tf hfp8_fwd RNE", "tf hfp8_fwd SR",
                 "tf DFP16 RNE"]



def _env_backend(name, fn):
    return machine.with_env(fn, TFHFP8_BACKEND=name)


def _cases(x, x_np):
    fwd = tfhfp8.formats.get("hfp8_fwd")  # float8_e4m3b11fnuz
    dfp16 = tfhfp8.DynamicFixedPoint(16)
    seed = tf.constant(1234, tf.int64)
    cases = machine.copy_floor_cases(x)

    # C++ kernels, called directly (eager), in each CPU variant this CPU supports, and
    # the TF-ops code of the same rounding compiled by XLA, format by format.
    _, variants = cpp_backend.cpu_variant()
    for label in _FORMATS.value:
        fmt = tfhfp8.formats.get(label)
        for rounding, short in _ROUNDINGS:
            for variant in variants:
                cases.append((f"C++ {label} {short} [{variant}]", machine.with_env(
                    lambda f=fmt, r=rounding: cpp_backend.quantize_float(x, f, r, True, seed),
                    TFHFP8_CPU_VARIANT=variant)))
            fn = tf.function(
                lambda v, f=fmt, r=rounding: tf_backend.quantize_float(v, f, r, True, seed),
                jit_compile=True, autograph=False)
            cases.append((f"TF-ops {label} {short} (XLA)", lambda fn=fn: fn(x)))

    # C++ dynamic fixed point, int16 per tensor: the rounding kernel alone, given the
    # exponent, and the fused kernel that finds the shared exponent too.
    exponent, inner = tf_backend.shared_exponents(x, dfp16, "nearest_even")
    cases.append(("C++ DFP16 per-tensor RNE (rounding only)",
                  lambda: cpp_backend.quantize_fixed(x, exponent, inner, 16, "nearest_even",
                                                     True, seed)))
    for rounding, short in [("nearest_even", "RNE"), ("stochastic", "SR")]:
        cases.append((f"C++ DFP16 per-tensor {short} (fused exponent)",
                      lambda r=rounding: cpp_backend.quantize_dfp(x, dfp16, r, True, seed)))

    # The public API (Python overhead, custom_gradient, casts, DFP reduction).
    for fmt, label in [(fwd, "hfp8_fwd"), (dfp16, "DFP16")]:
        for rounding, short in [("nearest_even", "RNE"), ("stochastic", "SR")]:
            cases.append((f"tfhfp8.quantize cpp {label} {short} (eager)", _env_backend(
                "cpp", lambda f=fmt, r=rounding: tfhfp8.quantize(x, f, r, True, 1234))))
    graph_public = tf.function(lambda v: tfhfp8.quantize(v, fwd, "nearest_even", True),
                               autograph=False)
    cases.append(("tfhfp8.quantize cpp hfp8_fwd RNE (tf.function)",
                  _env_backend("cpp", lambda: graph_public(x))))

    # TF-ops backend through the public API, eager: fused by XLA (tfhfp8.ops._fused).
    for fmt, label in [(fwd, "hfp8_fwd"), (dfp16, "DFP16")]:
        for rounding, short in [("nearest_even", "RNE"), ("stochastic", "SR")]:
            cases.append((f"tfhfp8.quantize tf {label} {short} (eager)", _env_backend(
                "tf", lambda f=fmt, r=rounding: tfhfp8.quantize(x, f, r, True, 1234))))

    # TF-ops backend functions as they are, unfused (graph).
    for rounding, short in [("nearest_even", "RNE"), ("stochastic", "SR")]:
        fn = tf.function(lambda v, r=rounding: tf_backend.quantize_float(v, fwd, r, True, seed),
                         autograph=False)
        cases.append((f"TF-ops hfp8_fwd {short} (graph)", lambda fn=fn: fn(x)))
    xla_public = tf.function(lambda v: tfhfp8.quantize(v, fwd, "stochastic", True, seed),
                             jit_compile=True, autograph=False)
    cases.append(("tfhfp8.quantize hfp8_fwd SR (XLA, TF-ops)", lambda: xla_public(x)))

    # tf.cast round trips.
    for jit, mode in [(False, "graph"), (True, "XLA")]:
        fn = tf.function(lambda v: tf.cast(tf.cast(v, E4M3FN), tf.float32),
                         jit_compile=jit, autograph=False)
        cases.append((f"tf.cast f32->e4m3fn->f32 ({mode})", lambda fn=fn: fn(x)))
        fn = tf.function(lambda v: tf.cast(tf.cast(v, tf.bfloat16), tf.float32),
                         jit_compile=jit, autograph=False)
        cases.append((f"tf.cast f32->bf16->f32 ({mode})", lambda fn=fn: fn(x)))

    cases.append(("ml_dtypes astype e4m3fn round trip",
                  lambda: x_np.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)))
    return cases


def _resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _measure_memory(case):
    """Peak memory one eager quantize of 2^26 float32 (256 MiB) adds to the process.

    A thread samples the resident size while the op runs (TensorFlow releases the GIL
    in its kernels); the baseline is the resident size just before, with the input
    already in memory. Linux only (/proc).
    """
    backend, label, short = case.split()
    fmt = {"hfp8_fwd": "hfp8_fwd", "DFP16": "int16_dfp"}[label]
    rounding = {"RNE": "nearest_even", "SR": "stochastic"}[short]
    os.environ["TFHFP8_BACKEND"] = backend
    x = tf.random.normal([1 << 26])
    tfhfp8.quantize(x[:1 << 17], fmt, rounding, True, 1)  # load the library, warm up
    tfhfp8.quantize(x[:1 << 17], fmt, rounding, True, 1)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    before = _resident_bytes()
    sampler.start()
    y = tfhfp8.quantize(x, fmt, rounding, True, 1)
    float(y[0])
    done.set()
    sampler.join()
    print((peak[0] - before) / (x.shape[0] * 4))


def _memory_table():
    print("\nPeak memory added by one eager tfhfp8.quantize of 256 MiB of float32, as a "
          "multiple of the input's size (fresh process each; the output itself is 1.0; the "
          "first call of a shape also compiles it with XLA on the tf backend):")
    for case in _MEMORY_CASES:
        result = subprocess.run([sys.executable, __file__, f"--memory_case={case}"],
                                capture_output=True, text=True)
        lines = result.stdout.split()
        growth = f"{float(lines[0]):.2f}" if result.returncode == 0 and lines else (
            "failed: " + result.stderr.strip().splitlines()[-1])
        print(f"  {case:20s} {growth}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _MEMORY_CASE.value:
        return _measure_memory(_MEMORY_CASE.value)
    n = 1 << _LOG2_SIZE.value
    print(machine.describe())
    print(f"{n} float32 elements (2^{_LOG2_SIZE.value}), best of {_REPEATS.value} interleaved "
          f"rounds after {_WARMUP.value} warm-up calls\n"
          f"library {tfhfp8.ops.build.library_path()}, CPU variant "
          f"{cpp_backend.cpu_variant()[0]} (supported: {' '.join(cpp_backend.cpu_variant()[1])})\n"
          f"load average before: {machine.load_average()}")
    cpp_backend.load()
    x_np = machine.test_values(n)
    x = tf.constant(x_np)

    cases = [(name, fn) for name, fn in _cases(x, x_np)
             if re.search(_FILTER.value, name) or name.startswith("copy floor")]
    best = machine.print_throughput(cases, n, _REPEATS.value, _WARMUP.value)
    _versus_xla_table(best)
    if _MEMORY.value:
        _memory_table()


def _versus_xla_table(best):
    """C++ against XLA's fusion of the TF-ops code, per format, rounding and variant:
    the XLA time over the C++ time (above 1: C++ is faster)."""
    rows = [(label, short) for label in _FORMATS.value for _, short in _ROUNDINGS
            if f"TF-ops {label} {short} (XLA)" in best]
    variants = [v for v in cpp_backend.cpu_variant()[1]
                if rows and f"C++ {rows[0][0]} {rows[0][1]} [{v}]" in best]
    if not rows or not variants:
        return
    print("\nC++ speed over XLA's (XLA time / C++ time; above 1: C++ faster):")
    print(f"  {'format':16s} {'rounding':8s} " + " ".join(f"{v:>10s}" for v in variants))
    for label, short in rows:
        xla = best[f"TF-ops {label} {short} (XLA)"]
        print(f"  {label:16s} {short:8s} " + " ".join(
            f"{xla / best[f'C++ {label} {short} [{v}]']:10.2f}" for v in variants))


if __name__ == "__main__":
    program.run(main)
