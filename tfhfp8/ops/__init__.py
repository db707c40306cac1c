"""The two backends of `tfhfp8.quantize` and of the accumulating GEMMs, bit-identical,
chosen per call.

- `cpp`: C++ CPU kernels on TF's intra-op thread pool (fastest on CPU), with the
  per-element loops compiled for several CPU variants and the best one chosen at run
  time (`backend_info()["cpu_variant"]`; `TFHFP8_CPU_VARIANT` forces one).
- `tf`: the same rounding written with TensorFlow ops; runs under XLA
  (`jit_compile=True`) and on GPU. Called outside an XLA-compiled function, it runs
  through one of its own (`_fused`), so that its dozens of element-wise ops fuse into
  one loop instead of materialising every intermediate tensor.

The `tf` backend is used inside XLA-compiled functions and when a GPU is visible;
otherwise `cpp`, when its library builds, except for the operations that XLA's fusion
of the `tf` code was measured to run faster than the C++ loops of the CPU variant in
use (`XLA_FASTER`). `TFHFP8_BACKEND=tf|cpp` forces one outside XLA-compiled functions
(inside them, always `tf`: XLA cannot compile the C++ ops); `forced_backend(...)` does
so for the code inside a `with` block. The accumulating GEMMs of `tfhfp8.gemm`
(`accumulating_matmul`, `int32_matmul`) run the C++ kernels wherever `quantize` runs
the `cpp` backend, and the TF-ops ones (`tf_accumulate`, XLA-compiled) otherwise.
"""

import contextlib
import functools
import os
import warnings

import tensorflow as tf

from tfhfp8 import _compat
from tfhfp8.ops import build, cpp_backend, tf_accumulate, tf_backend, tf_block, tf_fused

_BACKENDS = {"tf": tf_backend, "cpp": cpp_backend}
_cpp_error = None  # why the C++ library is unavailable, once we know


def _cpp_available():
    global _cpp_error
    if _cpp_error is None:
        try:
            cpp_backend.load()
            _cpp_error = ""
        except (build.BuildError, tf.errors.NotFoundError, OSError) as error:
            _cpp_error = str(error) or type(error).__name__
            warnings.warn(
                "tfhfp8: the C++ kernels are unavailable, using the TensorFlow-ops backend "
                f"(same results, slower on CPU). Reason: {_cpp_error}",
                RuntimeWarning, stacklevel=3)
    return _cpp_error == ""


_CPU_REASON = "CPU, C++ kernels loaded"


def _choose():
    forced = os.environ.get("TFHFP8_BACKEND", "").strip().lower()
    if forced and forced not in _BACKENDS:
        raise ValueError(f"TFHFP8_BACKEND must be 'tf' or 'cpp', got {forced!r}")
    if _compat.in_xla_context():  # XLA cannot compile custom ops: forced or not
        return "tf", "inside an XLA-compiled function"
    if forced:
        if forced == "cpp" and not _cpp_available():
            raise RuntimeError(f"TFHFP8_BACKEND=cpp but the C++ kernels failed: {_cpp_error}")
        return forced, "forced by TFHFP8_BACKEND"
    if tf.config.list_logical_devices("GPU"):
        return "tf", "a GPU is visible (the C++ kernels are CPU-only)"
    if _cpp_available():
        return "cpp", _CPU_REASON
    return "tf", f"C++ kernels unavailable: {_cpp_error.splitlines()[0]}"


@functools.lru_cache(maxsize=None)
def _compiled(function, *static):
    """`function(x, *static, seed)` as an XLA-compiled tf.function, one per `static`."""
    return tf.function(lambda x, seed: function(x, *static, seed), jit_compile=True,
                       autograph=False)


# Below this many elements (statically known), the intermediates are small and an XLA
# compilation per new shape would cost more than it saves.
_FUSE_MIN_ELEMENTS = 1 << 16


def run_fused(function, x, *args):
    """`function(x, *args)`, a TF-ops rounding whose last argument is the seed tensor,
    compiled by XLA into few loops unless already inside XLA or `x` is small."""
    *static, seed = args
    size = x.shape.num_elements()
    if _compat.in_xla_context() or (size is not None and size < _FUSE_MIN_ELEMENTS):
        return function(x, *args)
    return _compiled(function, *static)(x, seed)


class _fused:
    """The `tf` backend, each call on a large tensor compiled by XLA into one loop."""

    quantize_fixed = staticmethod(tf_backend.quantize_fixed)  # given exponents: one op

    @staticmethod
    def quantize_float(x, fmt, rounding, saturate, seed):
        return run_fused(tf_backend.quantize_float, x, fmt, rounding, saturate, seed)

    @staticmethod
    def quantize_dfp(x, fmt, rounding, saturate, seed):
        return run_fused(tf_backend.quantize_dfp, x, fmt, rounding, saturate, seed)

    @staticmethod
    def quantize_block(x, fmt, rounding, saturate, seed):
        return run_fused(tf_block.quantize_block, x, fmt, rounding, saturate, seed)


# The operations for which XLA's fusion of the TF-ops code measured faster than the C++
# loops, per CPU variant: (variant, operation, rounding), operation "float" (a
# FloatFormat), "dfp" (per-tensor dynamic fixed point), "fixed" (given exponents) or
# "block" (block-scaled). Read from the last table of benchmarks/quantize_throughput.py
# (docs/speed.md has the runs); only tensors large enough to be fused take this path
# (below _FUSE_MIN_ELEMENTS the TF-ops code runs op by op, far slower).
XLA_FASTER = frozenset({
    # AMD EPYC (Zen 1, AVX2 as two 128-bit halves), six formats, two runs: C++ stochastic
    # rounding at 0.6-0.93x XLA's speed in 11 of 12, toward zero below 1x in 8 of 12
    # (0.3-1.12x); nearest even at 1.2-4.7x stays on C++. (An Intel Xeon with the loops
    # forced to x86_64_v3 also gave XLA the edge for stochastic rounding: 0.68x against
    # 0.71x the copy floor.)
    ("x86_64_v3", "float", "stochastic"),
    ("x86_64_v3", "float", "toward_zero"),
})


@functools.lru_cache(maxsize=None)
def _variant(requested):
    """The CPU variant the C++ loops run when TFHFP8_CPU_VARIANT is `requested`."""
    return cpp_backend.cpu_variant()[0]


def _xla_measured_faster(operation, rounding, size):
    if operation is None or size is None or size < _FUSE_MIN_ELEMENTS:
        return False
    variant = _variant(os.environ.get("TFHFP8_CPU_VARIANT", ""))
    return (variant, operation, rounding) in XLA_FASTER


class _plain_tf:
    """The `tf` backend without `run_fused`: a traced graph holds only standard TF ops
    (what a SavedModel that serves without tfhfp8 needs)."""

    quantize_fixed = staticmethod(tf_backend.quantize_fixed)
    quantize_float = staticmethod(tf_backend.quantize_float)
    quantize_dfp = staticmethod(tf_backend.quantize_dfp)
    quantize_block = staticmethod(tf_block.quantize_block)


_forced = []  # backends of the enclosing `forced_backend` scopes, innermost last


@contextlib.contextmanager
def forced_backend(backend):
    """Within the scope, `tfhfp8.quantize` rounds with `backend` (this thread and any
    other: meant for tracing a model, not for concurrent use).

    `backend`: `"tf"` (the TensorFlow-ops functions, not XLA-compiled, so that a traced
    graph holds only standard TensorFlow ops), `"cpp"`, or an object with the
    functions of `tfhfp8.ops.tf_backend` (`quantize_float`, `quantize_fixed`,
    `quantize_dfp`, and `quantize_block` of `tfhfp8.ops.tf_block`), as `tfhfp8.export`
    passes to mark every quantization of a model.

    >>> import tensorflow as tf, tfhfp8
    >>> with tfhfp8.ops.forced_backend("tf"):
    ...     tfhfp8.quantize(tf.constant([0.1]), "float8_e4m3fn").numpy()
    array([0.1015625], dtype=float32)
    """
    if backend == "tf":
        backend = _plain_tf
    elif backend == "cpp":
        if not _cpp_available():
            raise RuntimeError(f"forced_backend('cpp'): the C++ kernels failed: {_cpp_error}")
        backend = cpp_backend
    elif not all(callable(getattr(backend, name, None)) for name in (
            "quantize_float", "quantize_fixed", "quantize_dfp", "quantize_block")):
        raise TypeError(f"backend must be 'tf', 'cpp' or an object with quantize_float, "
                        f"quantize_fixed, quantize_dfp and quantize_block; got {backend!r}")
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


def active_backend(operation=None, rounding=None, size=None):
    """The backend to use here and now for `operation` (see XLA_FASTER) with `rounding`
    on `size` elements (None: unknown): the innermost `forced_backend` scope's if any;
    the `tf` one through `run_fused`, which leaves calls inside XLA as they are."""
    if _forced:
        return _forced[-1]
    name, reason = _choose()
    if name == "cpp" and reason == _CPU_REASON and _xla_measured_faster(operation, rounding,
                                                                        size):
        return _fused
    return _fused if name == "tf" else _BACKENDS[name]


def backend_info():
    """Which backend `quantize` uses in the current context, and why.

    With the C++ kernels loaded, also the CPU variant of their loops that runs
    (`cpu_variant`) and the variants this CPU supports.

    >>> import tfhfp8
    >>> tfhfp8.ops.backend_info()["backend"] in ("cpp", "tf")
    True
    """
    name, reason = _choose()
    info = {"backend": name, "reason": reason, "tensorflow": tf.__version__}
    if _cpp_error == "":
        info["library"] = str(build.library_path())
        info["cpu_variant"], info["cpu_variants_supported"] = cpp_backend.cpu_variant()
        info["xla_faster"] = sorted(f"{operation} {rounding}" for variant, operation, rounding
                                    in XLA_FASTER if variant == info["cpu_variant"])
    elif _cpp_error:
        info["cpp_error"] = _cpp_error
    return info


# -- the accumulating GEMMs ----------------------------------------------------------------
def accumulation_backend():
    """`"cpp"` or `"tf"`: the backend of the accumulating GEMMs here and now (the C++
    kernels wherever `quantize` runs the `cpp` backend)."""
    return "cpp" if active_backend() is cpp_backend else "tf"


@functools.lru_cache(maxsize=None)
def _compiled_gemm(function, *static):
    """`function(a, b, *static, *rest)` as an XLA-compiled tf.function, one per `static`."""
    return tf.function(lambda *args: function(*args[:2], *static, *args[2:]),
                       jit_compile=True, autograph=False)


def accumulating_matmul(a, b, fmt, outer_format, products, rounding, saturate, chunk_size,
                        seed):
    """`(c, swamped)`: float32 `a` `[B, M, K]` @ `b` `[B, K, N]` summed in the float
    format `fmt`, on the backend `accumulation_backend` names (the arguments and
    results of `tfhfp8.ops.cpp_backend.accumulating_matmul`)."""
    static = (fmt, outer_format, products, rounding, saturate, chunk_size)
    if accumulation_backend() == "cpp":
        return cpp_backend.accumulating_matmul(a, b, *static, seed)
    if _compat.in_xla_context():
        return tf_accumulate.accumulating_matmul(a, b, *static, seed)
    return _compiled_gemm(tf_accumulate.accumulating_matmul, *static)(a, b, seed)


def int32_matmul(a_mantissas, b_mantissas, chunk_size, overflow):
    """`(c, overflows)`: the int32 mantissas `a_mantissas` `[B, M, K]` @ `b_mantissas`
    `[B, K, N]` summed in a 32-bit integer accumulator, on the backend
    `accumulation_backend` names (see `tfhfp8.ops.cpp_backend.int32_matmul`)."""
    if accumulation_backend() == "cpp":
        return cpp_backend.int32_matmul(a_mantissas, b_mantissas, chunk_size, overflow)
    if _compat.in_xla_context():
        return tf_accumulate.int32_matmul(a_mantissas, b_mantissas, chunk_size, overflow)
    return _compiled_gemm(tf_accumulate.int32_matmul, chunk_size, overflow)(a_mantissas,
                                                                            b_mantissas)


def fused_matmul(a, b, *arguments):
    """`(c, swamped)`: float32 `a` `[B, M, K]` @ `b` `[B, K, N]` summed by a matrix
    unit's fused dot-adds (`tfhfp8.ops.tf_fused.fused_matmul`, whose arguments follow
    `a` and `b`), on the backend `accumulation_backend` names (the C++ kernel and the TF
    ops give the same bits)."""
    if accumulation_backend() == "cpp":
        return cpp_backend.fused_matmul(a, b, *arguments)
    if _compat.in_xla_context():
        return tf_fused.fused_matmul(a, b, *arguments)
    return _compiled_gemm(tf_fused.fused_matmul, *arguments)(a, b)
