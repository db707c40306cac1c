"""Quick exactness check to run after every kernel change (prints, asserts nothing).

Compares both backends with ml_dtypes on 2M random float32 bit patterns for every
named float format, on float64/float16/bfloat16 inputs, and compares stochastic
rounding and dynamic fixed point between the backends. Expected: 0 mismatches
everywhere except 3 for float64 -> bfloat16, where ml_dtypes double-rounds
(float64 -> float32 -> bfloat16) and tfhfp8 rounds once.

    PYTHONPATH=. python benchmarks/check_exactness.py
"""

import os

import ml_dtypes
import numpy as np
import tensorflow as tf

import tfhfp8
from tfhfp8.ops import cpp_backend, tf_backend

rng = np.random.default_rng(0)
bits = rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32)
x = bits.view(np.float32)
specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, 0.1, 1000.0], np.float32)
x = np.concatenate([x, specials])
names = [n for n in tfhfp8.formats.names() if n not in ("int16_dfp", "hfp8_fwd", "hfp8_bwd")]
seed = tf.constant(0, tf.int64)
for name in names:
    fmt = tfhfp8.formats.get(name)
    ref = x.astype(getattr(ml_dtypes, name) if name != "float16" else np.float16).astype(np.float32)
    for be in (tf_backend, cpp_backend):
        y = be.quantize_float(tf.constant(x), fmt, "nearest_even", False, seed).numpy()
        same = (y.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(y) & np.isnan(ref))
        bad = np.flatnonzero(~same)
        print(f"{name:20s} {be.__name__.split('.')[-1]:12s} mismatches={bad.size}",
              "" if not bad.size else (x[bad[:3]], y[bad[:3]], ref[bad[:3]]))
# float64 / float16 / bfloat16 inputs
for dt, npdt in [(tf.float64, np.float64), (tf.float16, np.float16), (tf.bfloat16, ml_dtypes.bfloat16)]:
    if npdt is np.float64:
        xx = (rng.integers(0, 2**63, size=300_000, dtype=np.uint64).view(np.float64)
              * rng.choice([1, -1], 300_000))
        xx = np.concatenate([xx, rng.normal(size=100000) * 2.0**rng.integers(-140, 20, 100000)])
    else:
        xx = np.arange(0, 65536, dtype=np.uint16).view(npdt)
    for name in ["bfloat16", "float8_e4m3b11fnuz", "float8_e5m2", "float4_e2m1fn", "float8_e4m3fn",
                 "float16"]:
        fmt = tfhfp8.formats.get(name)
        ref = xx.astype(getattr(ml_dtypes, name) if name != "float16" else np.float16).astype(npdt)
        for be in ("tf", "cpp"):
            os.environ["TFHFP8_BACKEND"] = be
            y = tfhfp8.quantize(tf.constant(xx, dt), fmt).numpy()
            same = ((y.view(f"u{y.itemsize}") == ref.view(f"u{y.itemsize}"))
                    | (np.isnan(y.astype(np.float64)) & np.isnan(ref.astype(np.float64))))
            print(dt.name, name, be, "mismatches", (~same).sum(), xx[~same][:3], y[~same][:3],
                  ref[~same][:3])
# SR and DFP cross-backend
xs = tf.constant((rng.normal(size=1_000_001) * 2.0 ** rng.integers(-20, 5, 1_000_001))
                 .astype(np.float32))
for fmt in ["float8_e5m2", "float8_e4m3b11fnuz", tfhfp8.DynamicFixedPoint(16),
            tfhfp8.DynamicFixedPoint(8, axis=0)]:
    for r in ["stochastic", "nearest_even", "toward_zero"]:
        outs = []
        for be in ("tf", "cpp"):
            os.environ["TFHFP8_BACKEND"] = be
            per_slice = isinstance(fmt, tfhfp8.DynamicFixedPoint) and fmt.axis == 0
            inp = tf.reshape(xs[:1000000], [1000, 1000]) if per_slice else xs
            outs.append(tfhfp8.quantize(inp, fmt, rounding=r, seed=123, saturate=True).numpy())
        print(fmt, r, "tf vs cpp mismatches",
              np.sum(outs[0].view(np.uint32) != outs[1].view(np.uint32)))
# Stochastic rounding in float64 and with a seed whose high word is set.
xd = tf.cast(xs, tf.float64) * 1.000001
for fmt in ["float8_e5m2", "bfloat16"]:
    outs = []
    for be in ("tf", "cpp"):
        os.environ["TFHFP8_BACKEND"] = be
        outs.append(tfhfp8.quantize(xd, fmt, rounding="stochastic", seed=-(3 << 40) + 7,
                                    saturate=True).numpy())
    print("float64", fmt, "stochastic tf vs cpp mismatches",
          np.sum(outs[0].view(np.uint64) != outs[1].view(np.uint64)))
# The TF-ops backend's paths for statically unknown shapes (int64 flat index).
seed_t = tf.constant(-(5 << 33) + 11, tf.int64)
fwd = tfhfp8.formats.get("hfp8_fwd")
unknown = tf.function(lambda v: tf_backend.quantize_float(v, fwd, "stochastic", True, seed_t),
                      input_signature=[tf.TensorSpec([None], tf.float32)], autograph=False)
want = cpp_backend.quantize_float(xs, fwd, "stochastic", True, seed_t).numpy()
print("unknown shape SR tf vs cpp mismatches", np.sum(unknown(xs).numpy().view(np.uint32)
                                                      != want.view(np.uint32)))
exponent = tf.constant([-20], tf.int32)
unknown = tf.function(
    lambda v, e: tf_backend.quantize_fixed(v, e, tf.constant(1, tf.int64), 16, "stochastic", True,
                                           seed_t),
    input_signature=[tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.int32)],
    autograph=False)
want = cpp_backend.quantize_fixed(xs, exponent, tf.constant(1, tf.int64), 16, "stochastic", True,
                                  seed_t).numpy()
print("unknown shape DFP SR tf vs cpp mismatches",
      np.sum(unknown(xs, exponent).numpy().view(np.uint32) != want.view(np.uint32)))
print(tfhfp8.quantize(tf.constant([1.0, 0.1, 1000.0]), "hfp8_fwd", saturate=True))
