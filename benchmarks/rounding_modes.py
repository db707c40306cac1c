"""Throughput of the P3109 formats and every rounding direction (issue: P3109 and
stochastic rounding on r random bits) against the memory-copy floor.

The C++ float kernel of each CPU variant this machine supports (forced with
TFHFP8_CPU_VARIANT, through `tfhfp8.quantize` on the cpp backend), for a P3109 format
and each rounding: the five directed ones, the full-precision stochastic one and the
three r-bit variants (r = 8). Ratios to the copy floor from one interleaved run (a shared
machine is noisy: compare ratios, never absolute times across runs); asserts nothing.

    PYTHONPATH=. python benchmarks/rounding_modes.py [--log2_size 24] [--repeats 7]
        [--formats p3109_k8p4se,p3109_k8p3ue] [--random_bits 8] [--filter x86_64_v3]
"""

import tensorflow as tf
from absl import app, flags

import machine  # benchmarks/machine.py
import tfhfp8
from tfhfp8 import program
from tfhfp8.ops import cpp_backend

_LOG2_SIZE = flags.DEFINE_integer("log2_size", 24, "2^this float32 elements.", lower_bound=10)
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed interleaved rounds; the best counts.",
                                lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls of each case first.", lower_bound=0)
_FORMATS = flags.DEFINE_list("formats", ["p3109_k8p4se"], "The formats timed.")
_RANDOM_BITS = flags.DEFINE_integer("random_bits", 8, "r of the r-bit stochastic roundings.",
                                    lower_bound=1, upper_bound=23)
_FILTER = flags.DEFINE_string("filter", "", "Only the cases whose name contains this (the "
                              "copy floor always runs).")

_DIRECTED = ("nearest_even", "nearest_away", "toward_zero", "toward_positive",
             "toward_negative")


def _roundings():
    r = _RANDOM_BITS.value
    return _DIRECTED + ("stochastic", f"stochastic_r{r}", f"stochastic_odd_r{r}",
                        f"stochastic_fast_r{r}")


def _cases(x):
    cases = machine.copy_floor_cases(x)
    for variant in cpp_backend.cpu_variant()[1]:
        for name in _FORMATS.value:
            for rounding in _roundings():
                cases.append((f"C++ {name} {rounding} [{variant}]", machine.with_env(
                    lambda n=name, r=rounding: tfhfp8.quantize(x, n, r, True, 1234),
                    TFHFP8_BACKEND="cpp", TFHFP8_CPU_VARIANT=variant)))
    return cases


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    n = 1 << _LOG2_SIZE.value
    print(machine.describe())
    print(f"{n} float32 elements (2^{_LOG2_SIZE.value}), best of {_REPEATS.value} "
          f"interleaved rounds after {_WARMUP.value} warm-up calls; saturating\n"
          f"load average before: {machine.load_average()}")
    cpp_backend.load()
    x = tf.constant(machine.test_values(n))
    cases = [(name, fn) for name, fn in _cases(x)
             if not _FILTER.value or _FILTER.value in name or name.startswith("copy floor")]
    machine.print_throughput(cases, n, _REPEATS.value, _WARMUP.value)


if __name__ == "__main__":
    program.run(main)
