"""Throughput of block-scaled quantization (OCP MX, NVFP4, FP32 block scales) against
the copy floor.

Measures best-of-N elements/s, in one process, for the fused C++ kernel
(`Hfp8QuantizeBlock`, each CPU variant this machine supports), called directly and
through `tfhfp8.quantize`, and for the TF-ops code (`tfhfp8.ops.tf_block`, the `tf`
backend: XLA-compiled into few loops), with blocks along the last axis (and, for
MXFP8, along axis 0: strided blocks). Each is also given as a ratio to the
memory-copy floor `x * one` measured in the same run (the faster of a `tf.function`
and an XLA-compiled one, as in benchmarks/quantize_throughput.py): the machine is
shared and noisy, so compare ratios from one run, never absolute times across runs.

    PYTHONPATH=. python benchmarks/block_throughput.py [--log2_size 24] [--repeats 7]

Prints one table; asserts nothing.
"""

import tensorflow as tf
from absl import app, flags

import machine  # benchmarks/machine.py
import tfhfp8
from tfhfp8 import formats, program
from tfhfp8.ops import cpp_backend

_LOG2_SIZE = flags.DEFINE_integer("log2_size", 24, "2^this float32 elements, as rows of "
                                  "1024.", lower_bound=10)
_REPEATS = flags.DEFINE_integer(
    "repeats", 7, "Timed rounds over all cases; the best round of each case counts.",
    lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls of each case first.", lower_bound=0)
_FILTER = flags.DEFINE_string(
    "filter", "", "Only the cases whose name contains this (the copy floor always runs).")

_FORMATS = [("mxfp8_e4m3", "nearest_even"), ("mxfp8_e4m3", "stochastic"),
            ("nvfp4", "nearest_even"), ("mxint8", "nearest_even")]
_SHORT = {"nearest_even": "RNE", "stochastic": "SR"}



def _cases(x):
    seed = tf.constant(1234, tf.int64)
    cases = machine.copy_floor_cases(x)

    # The fused kernel, called directly (eager), in each CPU variant this CPU supports.
    _, variants = cpp_backend.cpu_variant()
    for variant in variants:
        for name, rounding in _FORMATS:
            cases.append((f"C++ {name} {_SHORT[rounding]} [{variant}]", machine.with_env(
                lambda f=formats.get(name), r=rounding: cpp_backend.quantize_block(
                    x, f, r, True, seed), TFHFP8_CPU_VARIANT=variant)))
    axis0 = tfhfp8.BlockScaled("float8_e4m3fn", 32, axis=0)
    cases.append(("C++ mxfp8_e4m3 RNE, blocks along axis 0",
                  lambda: cpp_backend.quantize_block(x, axis0, "nearest_even", True, seed)))

    # The public API on each backend, eager: cpp runs the kernel, tf the TF-ops code
    # compiled by XLA (tfhfp8.ops.run_fused).
    for backend in ("cpp", "tf"):
        for name, rounding in _FORMATS:
            cases.append((f"tfhfp8.quantize {backend} {name} {_SHORT[rounding]}", machine.with_env(
                lambda n=name, r=rounding: tfhfp8.quantize(x, n, r, True, 1234),
                TFHFP8_BACKEND=backend)))
        cases.append((f"tfhfp8.quantize {backend} mxfp8_e4m3 RNE, axis 0", machine.with_env(
            lambda: tfhfp8.quantize(x, axis0, "nearest_even", True, 1234),
            TFHFP8_BACKEND=backend)))

    # FP32 block scales (TE's Float8BlockScaling, DeepSeek-V3): TF ops in float32 around
    # the backend's element rounding, eager; and the whole XLA-compiled.
    for name in ("e4m3_1x128", "e4m3_128x128"):
        for backend in ("cpp", "tf"):
            cases.append((f"tfhfp8.quantize {backend} {name} RNE", machine.with_env(
                lambda n=name: tfhfp8.quantize(x, n, "nearest_even", True, 1234),
                TFHFP8_BACKEND=backend)))
        compiled = tf.function(lambda t, n=name: tfhfp8.quantize(t, n), jit_compile=True)
        cases.append((f"XLA-compiled tfhfp8.quantize {name} RNE", lambda c=compiled: c(x)))
    return cases


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    n = 1 << _LOG2_SIZE.value
    print(machine.describe())
    print(f"{n} float32 elements (2^{_LOG2_SIZE.value}, rows of 1024), best of "
          f"{_REPEATS.value} interleaved rounds after {_WARMUP.value} warm-up calls\n"
          f"library {tfhfp8.ops.build.library_path()}, CPU variant "
          f"{cpp_backend.cpu_variant()[0]} (supported: {' '.join(cpp_backend.cpu_variant()[1])})\n"
          f"load average before: {machine.load_average()}")
    cpp_backend.load()
    x_np = machine.test_values(n)
    x = tf.constant(x_np.reshape(-1, 1024))

    cases = [(name, fn) for name, fn in _cases(x)
             if not _FILTER.value or _FILTER.value in name or name.startswith("copy floor")]
    machine.print_throughput(cases, n, _REPEATS.value, _WARMUP.value)


if __name__ == "__main__":
    program.run(main)
