"""What the tests of the roundings beyond nearest even, stochastic and toward zero share
(tests/test_rounding_directions.py, tests/test_p3109_blocks.py): the random bits a seed
draws for a tensor, gfloat's block-scaled formats with those bits, and `tfhfp8.quantize`
on every CPU variant of the C++ loops."""

import gfloat
import numpy as np
import tensorflow as tf
from helpers import assert_same_bits
from p3109_reference import GF_MODE, hash_bits

import tfhfp8
from tfhfp8.formats import roundings

NEW_ROUNDINGS = ["nearest_away", "toward_positive", "toward_negative", "stochastic_r1",
                 "stochastic_r5", "stochastic_odd_r3", "stochastic_fast_r8", "stochastic_r23"]
SEED = 20261207


def seeded_draws(x, rounding, seed, dtype=tf.float32):
    """The r random bits per element the TF-ops backend draws from `seed` for a tensor
    of `x`'s shape rounded in `dtype`'s container (None when `rounding` draws none)."""
    r = roundings.parse(rounding).random_bits
    if r is None:
        return None
    return hash_bits(np.size(x), seed, r, dtype).reshape(np.shape(x))


def block_inputs():
    """Rows of 32-element blocks at magnitudes from 2^-20 to 2^20, and values on the
    element grid's midpoints and quarter points (ties and near-ties for every rounding)."""
    rng = np.random.default_rng(5)
    scales = np.exp2(rng.integers(-20, 20, (6, 4, 1)))
    x = rng.standard_normal((6, 4, 32)) * scales
    x[0] = np.round(x[0] * 8) / 8 + rng.choice([0.5, 0.25, -0.5], x[0].shape) / 8
    return x.reshape(6, 128).astype(np.float32)


def gfloat_blocks(etype, size, x, rounding, draws, scale_of=None):
    """Blocks of `size` along x's last axis, from gfloat: each block's scale
    `scale_of(amax)` (default `compute_scale_amax`: OCP MX), its elements rounded by
    `round_ndarray` (saturating) with the r random bits `draws` of each element; a zero
    scale gives zeros. Negative inputs of an unsigned `etype`, which gfloat leaves
    undefined (garbage from `round_ndarray`, an error from `encode_block`), give +0:
    tfhfp8's rule, P3109's saturation to [0, max]. Returns float64 values."""
    scale_of = scale_of or (lambda amax: gfloat.compute_scale_amax(etype.emax, amax))
    parsed = roundings.parse(rounding)
    out = np.zeros(x.shape, np.float64)
    for row in range(x.shape[0]):
        for i in range(0, x.shape[1], size):
            block = x[row, i:i + size].astype(np.float64)
            scale = scale_of(np.max(np.abs(block)))
            if scale == 0:
                continue
            bits = None if draws is None else draws[row, i:i + size]
            with np.errstate(all="ignore"):  # gfloat on negatives of unsigned formats
                q = gfloat.round_ndarray(etype, block / scale, GF_MODE[parsed.mode], True, bits,
                                         parsed.random_bits or 0)
            if not etype.is_signed:
                q = np.where(np.signbit(block) & ~np.isnan(block), 0.0, q)
            out[row, i:i + size] = scale * q
    return out


def quantize_variants(backend, monkeypatch, x, fmt, rounding, **kwargs):
    """`tfhfp8.quantize` on `backend` (C++: with every CPU variant's loops), the
    results checked equal to each other; returns the first."""
    variants = tfhfp8.ops.backend_info()["cpu_variants_supported"] if backend == "cpp" else [""]
    results = []
    for variant in variants:
        monkeypatch.setenv("TFHFP8_CPU_VARIANT", variant)
        with tfhfp8.ops.forced_backend(backend):
            results.append(tfhfp8.quantize(x, fmt, rounding, seed=SEED, **kwargs).numpy())
    for variant, got in zip(variants[1:], results[1:]):
        assert_same_bits(got, results[0], x, f"{variant} {fmt} {rounding}")
    return results[0]
