"""The roundings beyond nearest even, stochastic and toward zero on dynamic fixed point
(against gfloat, through a float format whose subnormals are the multiples of the shared
exponent), on the elements of block-scaled formats (OCP MX against gfloat; P3109
elements and scales: tests/test_p3109_blocks.py), and on every CPU variant of the C++
float and fixed-point loops (against the TF-ops backend, which tests/test_p3109.py checks
against gfloat). The helpers both files use: tests/rounding_reference.py."""

import gfloat
import gfloat.formats as gf
import numpy as np
import pytest
import tensorflow as tf
from gfloat.types import Domain, FormatInfo
from helpers import assert_same_bits
from p3109_reference import GF_MODE
from rounding_reference import (NEW_ROUNDINGS, SEED, block_inputs, gfloat_blocks,
                                quantize_variants, seeded_draws)

import tfhfp8
from tfhfp8.formats import roundings

def _inputs(bits, count=3000):
    """Values on, between and just beside the multiples of 2^-8, up to 2^(bits - 9) in
    magnitude, both signs, and a largest magnitude whose rounding up overflows or not."""
    rng = np.random.default_rng(bits)
    top = 2.0 ** (bits - 9)
    grid = rng.integers(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), count) / 256.0
    offsets = rng.choice([0.0, 0.5, 0.25, 0.75, 1 / 3, 2 ** -20], count) / 256.0
    x = (grid + np.sign(grid) * offsets).astype(np.float32)
    return np.concatenate([x, np.float32([top * (1 - 2.0 ** -bits), -top * 0.999, 0.0])])


def _reference_dfp(x, bits, rounding, draws):
    """Dynamic fixed point per tensor, from the definition: E_s = E_max - (bits - 2), one
    more where max|x| may round up to 2^(bits-1) (to nearest: from half an ulp below it;
    stochastic and directed: from anything above 2^(bits-1) - 1); every element rounded by
    gfloat to a float format whose subnormals are the multiples of 2^E_s and that holds
    every |x| below its smallest normal."""
    parsed = roundings.parse(rounding)
    largest = float(np.max(np.abs(x)))
    e_max = int(np.floor(np.log2(largest)))
    needed = largest / 2.0 ** (e_max - (bits - 2))
    limit = 2 ** (bits - 1) - 1
    if parsed.mode in ("nearest_even", "nearest_away"):
        bump = needed >= limit + 0.5
    else:
        bump = parsed.mode != "toward_zero" and needed > limit
    exponent = e_max - (bits - 2) + int(bump)
    # Subnormal quantum 2^(1 - bias - (precision - 1)) = 2^exponent.
    info = FormatInfo("dfp", k=bits + 9, precision=bits, bias=2 - bits - exponent,
                      has_nz=True, domain=Domain.Extended, num_high_nans=2 ** (bits - 1) - 1,
                      has_subnormals=True, is_signed=True, is_twos_complement=False)
    r = parsed.random_bits
    draws = np.zeros(x.size, np.int64) if draws is None else draws
    return np.array([gfloat.round_float(info, float(v), GF_MODE[parsed.mode], False, int(s),
                                        r or 0) for v, s in zip(x, draws)], np.float32)


@pytest.mark.parametrize("backend", ["tf", "cpp"])
@pytest.mark.parametrize("rounding", NEW_ROUNDINGS)
@pytest.mark.parametrize("bits", [8, 16])
def test_dynamic_fixed_point_matches_gfloat(backend, rounding, bits):
    x = _inputs(bits)
    with tfhfp8.ops.forced_backend(backend):
        got = tfhfp8.quantize(tf.constant(x), tfhfp8.DynamicFixedPoint(bits), rounding,
                              seed=SEED).numpy()
    expected = _reference_dfp(x, bits, rounding, seeded_draws(x, rounding, SEED))
    assert_same_bits(got, expected, x, rounding)


@pytest.mark.parametrize("rounding", NEW_ROUNDINGS)
def test_dynamic_fixed_point_per_slice_and_block_agree_across_backends(rounding):
    x = tf.constant(_inputs(12, 4000)[:4000].reshape(40, 100))
    for fmt in (tfhfp8.DynamicFixedPoint(12, axis=0), tfhfp8.DynamicFixedPoint(12, block_size=32)):
        results = []
        for backend in ("tf", "cpp"):
            with tfhfp8.ops.forced_backend(backend):
                results.append(tfhfp8.quantize(x, fmt, rounding, seed=SEED).numpy())
        assert_same_bits(results[1], results[0], x, f"{fmt} {rounding}")


@pytest.mark.parametrize("name", ["p3109_k8p3se", "p3109_k8p4uf", "float8_e4m3fn", "bfloat16"])
def test_every_cpu_variant_rounds_as_the_tf_ops(monkeypatch, name):
    rng = np.random.default_rng(1)
    fmt = tfhfp8.formats.get(name)
    x = np.concatenate([rng.normal(size=5000) * fmt.max / 8, fmt.values()[:200] * 1.37,
                        [fmt.max * 1.5, np.inf, -np.inf, np.nan]]).astype(np.float32)
    x = np.concatenate([x, -x])
    cases = [(rounding, saturate) for rounding in NEW_ROUNDINGS
             for saturate in (False, True, "sat_propagate")]
    with tfhfp8.ops.forced_backend("tf"):
        expected = [tfhfp8.quantize(x, fmt, r, s, seed=SEED).numpy() for r, s in cases]
    variants = tfhfp8.ops.backend_info()["cpu_variants_supported"]
    for variant in variants:
        monkeypatch.setenv("TFHFP8_CPU_VARIANT", variant)
        with tfhfp8.ops.forced_backend("cpp"):
            for (rounding, saturate), want in zip(cases, expected):
                got = tfhfp8.quantize(x, fmt, rounding, saturate, seed=SEED).numpy()
                assert_same_bits(got, want, x, f"{variant} {name} {rounding} {saturate}")
                dfp = tfhfp8.DynamicFixedPoint(10)
                with tfhfp8.ops.forced_backend("tf"):
                    want_dfp = tfhfp8.quantize(x[:-1], dfp, rounding, seed=SEED).numpy()
                got_dfp = tfhfp8.quantize(x[:-1], dfp, rounding, seed=SEED).numpy()
                assert_same_bits(got_dfp, want_dfp, x[:-1], f"{variant} DFP {rounding}")


# -- block-scaled formats: the elements round with every rounding --

GF_BLOCKS = {"mxfp8_e4m3": gf.format_info_mxfp8_e4m3,
             "mxfp6_e2m3": gf.format_info_mxfp6_e2m3,
             "mxfp4_e2m1": gf.format_info_mxfp4_e2m1}


def _gfloat_mx(name, x, rounding, draws):
    """OCP MX from gfloat (`gfloat_blocks`), as float32."""
    info = GF_BLOCKS[name]
    return gfloat_blocks(info.etype, info.k, x, rounding, draws).astype(np.float32)


@pytest.mark.parametrize("name", sorted(GF_BLOCKS))
def test_mx_reference_is_gfloats_own_blocks(name):
    """The reference above is gfloat's `quantize_block` where that applies (no random
    bits)."""
    x = block_inputs()
    for rounding in ("nearest_even", "toward_positive", "nearest_away"):
        ours = _gfloat_mx(name, x, rounding, None)
        theirs = np.concatenate([
            gfloat.quantize_block(GF_BLOCKS[name], row[i:i + 32].astype(np.float64),
                                  gfloat.compute_scale_amax, GF_MODE[rounding])
            for row in x for i in range(0, 128, 32)]).reshape(x.shape)
        assert_same_bits(ours, theirs.astype(np.float32), x, f"{name} {rounding}")


@pytest.mark.parametrize("backend", ["tf", "cpp"])
@pytest.mark.parametrize("rounding", NEW_ROUNDINGS)
@pytest.mark.parametrize("name", sorted(GF_BLOCKS))
def test_mx_elements_take_every_rounding(monkeypatch, backend, rounding, name):
    """On the C++ backend, with the loops of every CPU variant."""
    x = block_inputs()
    expected = _gfloat_mx(name, x, rounding, seeded_draws(x, rounding, SEED))
    got = quantize_variants(backend, monkeypatch, x, name, rounding)
    assert_same_bits(got, expected, x, f"{name} {rounding}")


# Ties of each element grid under a scale of exactly 1: NVFP4's tensor scale is
# amax / (448 * 6) and its block scale block_amax / 6; per-tensor current scaling's scale
# is amax / 448. Each tie and the value nearest_away gives it.
TIES = {"nvfp4": ([2688.0] + [0.0] * 15 + [6.0, 2.5, -2.5, 0.25, 1.25, 5.0, -0.75] + [0.0] * 9,
                  {17: 3.0, 18: -3.0, 19: 0.5, 20: 1.5, 21: 6.0, 22: -1.0}),
        "e4m3_current": ([448.0, 1.0625, -1.0625, 2.125, 0.4375 + 1 / 64] + [0.0] * 27,
                         {1: 1.125, 2: -1.125, 3: 2.25, 4: 0.46875})}


@pytest.mark.parametrize("rounding", NEW_ROUNDINGS)
@pytest.mark.parametrize("name", ["nvfp4", "e4m3_current"])
def test_float_scaled_formats_take_every_rounding_on_both_backends(rounding, name):
    """NVFP4 (E4M3 block scales within an FP32 tensor scale) and per-tensor current
    scaling: the elements round in float64 on both backends, with the same bits."""
    x = block_inputs()
    results = []
    for backend in ("tf", "cpp"):
        with tfhfp8.ops.forced_backend(backend):
            results.append(tfhfp8.quantize(x, name, rounding, seed=SEED).numpy())
            if rounding == "nearest_away":
                ties, away = TIES[name]
                tied = tfhfp8.quantize(np.float32([ties]), name, rounding).numpy()[0]
                np.testing.assert_array_equal(tied[list(away)], list(away.values()))
    assert_same_bits(results[1], results[0], x, f"{name} {rounding}")
    if rounding != "nearest_away":  # which differs only on ties
        nearest = tfhfp8.quantize(x, name).numpy()
        assert np.mean(results[0] != nearest) > 0.05  # the rounding was applied


# -- the user's random bits (noise=) for every kind of format --

R_BIT_ROUNDINGS = [r for r in NEW_ROUNDINGS if roundings.parse(r).random_bits]


def _noise(x, rounding):
    r = roundings.parse(rounding).random_bits
    return np.random.default_rng(r).integers(0, 1 << r, x.shape)


@pytest.mark.parametrize("rounding", R_BIT_ROUNDINGS)
def test_noise_rounds_dynamic_fixed_point_as_gfloat(rounding):
    x = _inputs(8)
    noise = _noise(x, rounding)
    got = tfhfp8.quantize(x, tfhfp8.DynamicFixedPoint(8), rounding, noise=noise).numpy()
    assert_same_bits(got, _reference_dfp(x, 8, rounding, noise), x, f"noise {rounding}")


@pytest.mark.parametrize("rounding", R_BIT_ROUNDINGS)
@pytest.mark.parametrize("name", sorted(GF_BLOCKS))
def test_noise_rounds_mx_elements_as_gfloat(name, rounding):
    x = block_inputs()
    noise = _noise(x, rounding)
    got = tfhfp8.quantize(x, name, rounding, noise=noise).numpy()
    assert_same_bits(got, _gfloat_mx(name, x, rounding, noise), x, f"{name} {rounding}")


@pytest.mark.parametrize("rounding", ["stochastic_r5", "stochastic_fast_r8"])
@pytest.mark.parametrize("fmt,container", [
    ("nvfp4", tf.float64), ("e4m3_current", tf.float32),
    (tfhfp8.DynamicFixedPoint(8, axis=1, block_size=16), tf.float32)],
    ids=["nvfp4", "e4m3_current", "block_dfp"])
def test_noise_equal_to_the_seeds_draws_rounds_alike(fmt, container, rounding):
    """NVFP4's elements round in float64 (the draws of a float64 container), the others
    in float32; rank 9 takes `quantize`'s path for ranks above 8 (a rank-1 or rank-3
    view, the noise reshaped alike)."""
    x = block_inputs().reshape(3, 2, 2, 2, 2, 2, 2, 2, 2)
    seeded = tfhfp8.quantize(x, fmt, rounding, seed=SEED).numpy()
    draws = seeded_draws(x, rounding, SEED, container)
    got = tfhfp8.quantize(x, fmt, rounding, noise=draws).numpy()
    assert_same_bits(got, seeded, x, f"{fmt} {rounding}")
    other = tfhfp8.quantize(x, fmt, rounding, noise=(draws + 1) % 32).numpy()
    assert np.mean(other != seeded) > 0.01  # the noise was used
