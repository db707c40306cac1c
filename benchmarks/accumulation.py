"""Speed of the emulated-accumulation GEMMs against tf.linalg.matmul in FP32.

One GEMM of ResNet-20's widest convolution as im2col would give it (M = N = 256 by
default, K = 2304 = 3 x 3 x 256), operands rounded to float8_e4m3fn (float
accumulators) or integer mantissas of 16-bit dynamic fixed point (INT32). Every case is
timed in interleaved rounds with the FP32 baseline, best of N, and given as a ratio to
it (`x fp32` = baseline time / case time; higher is faster; the baseline is the faster
of two FP32 matmuls of the same shape, on the float8 operands and on the mantissas),
in wall-clock time and in process CPU time (all threads; on a shared machine, where a
process gets only part of the cores, the steadier measure of the work). The C++ rows run once per
CPU variant this CPU supports. The TF-ops rows (`tfhfp8.ops.tf_accumulate`, XLA) run
when that module exists.

    PYTHONPATH=. python benchmarks/accumulation.py [--m 256 --n 256 --k 2304 --repeats 5]

What limits each (printed after the table):
- FP32 matmul: the FMA units (oneDNN's GEMM: one fused multiply-add per lane).
- Float accumulators: the instruction count, not memory. With AVX-512 one
  multiply-add of 16 outputs is about 38 vector instructions: the product, TwoSum
  (6), the step to the round-to-odd neighbour (6), the rounding to the format (about
  15: normal and subnormal ranges, overflow, NaN), the swamping count, and the sum's
  load and store. IEEE FP16 to nearest (not saturating, products exact) rounds with
  the F16C conversion instead (vcvtps2ph and back, x86-64-v3 and v4): about 20, the
  sums held in registers. The order of k is part of the definition, so nothing can be
  reassociated or blocked as a GEMM is; AVX2 has half the lanes, the SSE2 baseline a
  quarter (and no F16C). Stochastic rounding adds two 64-bit hash evaluations per
  addition and the general rounding path.
- INT32: pmaddwd computes two 16-bit products and their sum in one instruction; with
  the add and the overflow-bound check (an OR of the sums biased by 2^30, one
  ternary-logic instruction for two sums with AVX-512) that is 2.5 instructions per
  32 multiply-adds with AVX-512 (AVX-512 VNNI's vpdpwssd would fuse the first two, but
  it is not in x86-64-v4).
  A block of terms whose sums leave [-2^30, 2^30) (full-scale 16-bit mantissas reach
  it within a few hundred terms) is done term by term with exact overflow detection,
  about 4 times slower: chunks of 64 keep the partial sums small and avoid it.
- Fused accumulators (tensor cores, `nvidia_hopper_fp8`, ...): per product and output,
  in doubles, with the output columns in SIMD lanes: the product (twice: once for the
  group's largest exponent, once for its term), the exponent sum and maximum, the
  finiteness check, the scaling, the truncation and the add, about 12 vector
  instructions; then, per group of 32, the rounding of the sum. Exact in double, so
  4 lanes with AVX2 and 8 with AVX-512 against FP32 matmul's 16 FMA lanes, and nothing
  of a GEMM's blocking.
- TF-ops (XLA): a while loop over k (groups for the fused accumulators), one [M, N]
  element-wise step per term.

Prints a table; asserts nothing.
"""

import importlib
import os
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

import machine  # benchmarks/machine.py
import tfhfp8
from tfhfp8 import program
from tfhfp8.ops import cpp_backend

_M = flags.DEFINE_integer("m", 256, "Rows of the output.", lower_bound=1)
_N = flags.DEFINE_integer("n", 256, "Columns of the output.", lower_bound=1)
_K = flags.DEFINE_integer("k", 2304, "Terms per dot product.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds; the best of each case counts.",
                                lower_bound=1)
_TF_OPS = flags.DEFINE_boolean("tf_ops", True, "Also time the TF-ops (XLA) implementation.")
_THREADS = flags.DEFINE_integer("threads", 0, "TF intra-op threads (0: TF's default, all "
                                "cores); 1 compares single-core speed, less sensitive to load.",
                                lower_bound=0)


def _with_variant(fn, variant):
    def wrapped():
        old = os.environ.get("TFHFP8_CPU_VARIANT")
        os.environ["TFHFP8_CPU_VARIANT"] = variant
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("TFHFP8_CPU_VARIANT", None)
            else:
                os.environ["TFHFP8_CPU_VARIANT"] = old
    return wrapped


def _cases(m, n, k):
    rng = np.random.default_rng(0)
    e4m3 = "float8_e4m3fn"
    a = tfhfp8.quantize(tf.constant(rng.standard_normal((1, m, k), np.float32)), e4m3)
    b = tfhfp8.quantize(tf.constant(rng.standard_normal((1, k, n), np.float32)), e4m3)
    # int16 DFP mantissas of normal data: max|x| near 2^14, most far smaller.
    def mantissas(shape):
        x = rng.standard_normal(shape)
        return tf.constant(np.round(x / np.abs(x).max() * 2**14).astype(np.int32))
    ia, ib = mantissas((1, m, k)), mantissas((1, k, n))
    fa, fb = tf.cast(ia, tf.float32), tf.cast(ib, tf.float32)
    seed = tf.constant(1, tf.int64)
    matmul = tf.function(lambda x, y: tf.linalg.matmul(x, y), autograph=False)
    cases = [("tf.linalg.matmul FP32 (baseline)", lambda: matmul(a, b)),
             ("tf.linalg.matmul FP32 of the int16 mantissas", lambda: matmul(fa, fb))]
    float_accs = [("FP16 acc", tfhfp8.Accumulator("float16")),
                  ("FP16 acc chunk 64", tfhfp8.Accumulator("float16", chunk_size=64)),
                  ("BF16 acc", tfhfp8.Accumulator("bfloat16")),
                  ("FP16 acc stochastic", tfhfp8.Accumulator("float16", rounding="stochastic"))]
    e4m3_type = tfhfp8.formats.get(e4m3)
    fused_accs = [(name, tfhfp8.accumulation.get(name).kernel_arguments(e4m3_type, e4m3_type))
                  for name in ("nvidia_hopper_fp8", "nvidia_hopper_fp8_promote128")]
    for variant in cpp_backend.cpu_variant()[1][::-1]:
        for label, arguments in fused_accs:
            cases.append((f"C++ {label} [{variant}]", _with_variant(
                lambda arguments=arguments: cpp_backend.fused_matmul(a, b, *arguments),
                variant)))
        for label, acc in float_accs:
            cases.append((f"C++ {label} [{variant}]", _with_variant(
                lambda acc=acc: cpp_backend.accumulating_matmul(
                    a, b, *acc.kernel_arguments(), seed), variant)))
        for chunk, overflow, label in [(None, "wrap", "INT32"),
                                       (None, "saturate", "INT32 saturate"),
                                       (64, "wrap", "INT32 chunk 64")]:
            cases.append((f"C++ {label} [{variant}]", _with_variant(
                lambda c=chunk, o=overflow: cpp_backend.int32_matmul(ia, ib, c, o), variant)))
    if _TF_OPS.value:
        try:
            tf_accumulate = importlib.import_module("tfhfp8.ops.tf_accumulate")
        except ImportError:
            tf_accumulate = None
        if tf_accumulate is not None:
            acc = tfhfp8.Accumulator("float16")
            fn = tf.function(lambda x, y: tf_accumulate.accumulating_matmul(
                x, y, *acc.kernel_arguments(), seed), jit_compile=True, autograph=False)
            cases.append(("TF-ops FP16 acc (XLA)", lambda: fn(a, b)))
            fn32 = tf.function(lambda x, y: tf_accumulate.int32_matmul(x, y, None, "wrap"),
                               jit_compile=True, autograph=False)
            cases.append(("TF-ops INT32 (XLA)", lambda: fn32(ia, ib)))
            tf_fused = importlib.import_module("tfhfp8.ops.tf_fused")
            fused = tf.function(lambda x, y: tf_fused.fused_matmul(x, y, *fused_accs[0][1]),
                                jit_compile=True, autograph=False)
            cases.append((f"TF-ops {fused_accs[0][0]} (XLA)", lambda: fused(a, b)))
    return cases


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    m, n, k = _M.value, _N.value, _K.value
    if _THREADS.value:
        tf.config.threading.set_intra_op_parallelism_threads(_THREADS.value)
    print(machine.describe())
    active, supported = cpp_backend.cpu_variant()
    print(f"GEMM M={m} N={n} K={k} ({m * n * k / 1e6:.0f} M multiply-adds), best of "
          f"{_REPEATS.value} interleaved rounds after one warm-up call\n"
          f"CPU variants supported: {' '.join(supported)} (default: {active})\n"
          f"load average before: {machine.load_average()}")
    cases = _cases(m, n, k)
    for _, fn in cases:
        fn()  # warm-up (and XLA compilation)
    best = [float("inf")] * len(cases)
    best_cpu = [float("inf")] * len(cases)
    for _ in range(_REPEATS.value):
        for j, (_, fn) in enumerate(cases):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = fn()
            if isinstance(result, (tuple, list)):
                result = result[0]
            float(tf.reshape(result, [-1])[0])  # wait for the result
            best[j] = min(best[j], time.perf_counter() - start)
            best_cpu[j] = min(best_cpu[j], time.process_time() - start_cpu)
    # The same FP32 GEMM twice (float8 operands, mantissas): the faster run.
    baseline, baseline_cpu = min(best[:2]), min(best_cpu[:2])
    width = max(len(name) for name, _ in cases)
    print(f"\n{'case':{width}s}  {'ms':>9s}  {'G MAC/s':>8s}  {'x fp32':>7s}  "
          f"{'CPU ms':>9s}  {'x fp32':>7s}")
    for (name, _), seconds, cpu in zip(cases, best, best_cpu):
        print(f"{name:{width}s}  {seconds * 1e3:9.2f}  {m * n * k / seconds / 1e9:8.2f}  "
              f"{baseline / seconds:7.3f}  {cpu * 1e3:9.2f}  {baseline_cpu / cpu:7.3f}")
    print(f"load average after: {machine.load_average()}")
    print("\n" + __doc__[__doc__.index("What limits each"):__doc__.index("Prints a table")].strip())


if __name__ == "__main__":
    program.run(main)
