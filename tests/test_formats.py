"""tfhfp8.formats: named formats against ml_dtypes, construction, lookup, errors."""

import re

import ml_dtypes
import numpy as np
import pytest

import reference as R
import tfhfp8
from tfhfp8 import formats

ALIASES = {"hfp8_fwd": "float8_e4m3b11fnuz", "hfp8_bwd": "float8_e5m2"}
# The named formats, from their definitions (ml_dtypes; bias 11 for 1-4-3 of HFP8):
# name -> (e, m, bias, specials).
FORMAT_TABLE = {
    "bfloat16": (8, 7, 127, "ieee"),
    "float16": (5, 10, 15, "ieee"),
    "float8_e5m2": (5, 2, 15, "ieee"),
    "float8_e5m2fnuz": (5, 2, 16, "fnuz"),
    "float8_e4m3": (4, 3, 7, "ieee"),
    "float8_e4m3fn": (4, 3, 7, "fn"),
    "float8_e4m3fnuz": (4, 3, 8, "fnuz"),
    "float8_e4m3b11fnuz": (4, 3, 11, "fnuz"),
    "float8_e3m4": (3, 4, 3, "ieee"),
    "float6_e3m2fn": (3, 2, 3, "finite"),
    "float6_e2m3fn": (2, 3, 1, "finite"),
    "float4_e2m1fn": (2, 1, 1, "finite"),
}
FLOAT_NAMES = sorted(FORMAT_TABLE)


def np_type(name):
    return np.float16 if name == "float16" else getattr(ml_dtypes, name)


def all_codes(name):
    """Every bit pattern of the ml_dtypes type, as that type."""
    dtype = np.dtype(np_type(name))
    bits = ml_dtypes.finfo(dtype).bits
    if dtype.itemsize == 2:
        return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)
    # 8-, 6- and 4-bit types are stored one per byte in the low bits.
    return np.arange(1 << bits, dtype=np.uint16).astype(np.uint8).view(dtype)


def test_names_cover_the_spec_table_and_aliases():
    names = formats.names()
    assert set(FORMAT_TABLE) | set(ALIASES) | {"int16_dfp"} <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_parameters_match_spec_table(name):
    fmt = formats.get(name)
    assert isinstance(fmt, tfhfp8.FloatFormat)
    e, m, bias, specials = FORMAT_TABLE[name]
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.specials) == (e, m, bias, specials)
    assert fmt.subnormals is True


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_properties_equal_ml_dtypes_finfo(name):
    fmt = formats.get(name)
    info = ml_dtypes.finfo(np_type(name))
    assert fmt.max == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.epsilon == float(info.eps)
    assert fmt.bits == info.bits
    assert fmt.has_inf == bool(np.isinf(all_codes(name).astype(np.float32)).any())
    assert fmt.has_nan == bool(np.isnan(all_codes(name).astype(np.float32)).any())


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_values_are_all_finite_nonnegative_values_of_ml_dtypes(name):
    decoded = all_codes(name).astype(np.float64)
    expected = np.unique(decoded[np.isfinite(decoded) & (decoded >= 0)])  # -0 == 0
    values = formats.get(name).values()
    assert values.dtype == np.float64
    np.testing.assert_array_equal(values, expected)
    assert np.all(np.diff(values) > 0)


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_values_match_reference_decoding(name):
    fmt = formats.get(name)
    np.testing.assert_array_equal(fmt.values(), R.finite_values(R.Spec.of(fmt)))


CUSTOM = [
    dict(exponent_bits=3, mantissa_bits=4, bias=5),
    dict(exponent_bits=2, mantissa_bits=0, specials="fn"),
    dict(exponent_bits=5, mantissa_bits=2, bias=20, specials="fnuz", subnormals=False),
    dict(exponent_bits=4, mantissa_bits=3, bias=-3, specials="finite"),
    dict(exponent_bits=7, mantissa_bits=6, bias=60, specials="ieee", subnormals=False),
    dict(exponent_bits=6, mantissa_bits=1, specials="fn"),
]


@pytest.mark.parametrize("params", CUSTOM, ids=str)
def test_custom_properties_match_reference(params):
    fmt = tfhfp8.FloatFormat(**params)
    spec = R.Spec.of(fmt)
    values = R.finite_values(spec)
    assert fmt.max == values[-1]
    positive = [v for v in values if v > 0]
    assert fmt.min_subnormal == positive[0]
    assert fmt.min_normal == 2.0 ** (1 - spec.bias)
    assert fmt.epsilon == 2.0 ** -spec.m
    assert fmt.bits == 1 + spec.e + spec.m
    np.testing.assert_array_equal(fmt.values(), values)


def test_default_bias_is_ieee():
    for e in range(2, 9):
        assert tfhfp8.FloatFormat(e, 2).bias == 2 ** (e - 1) - 1


def test_docstring_example():
    fmt = tfhfp8.FloatFormat(exponent_bits=3, mantissa_bits=4, bias=5)
    # max: E = 6, M = 15 -> 2^(6-5) * (1 + 15/16); min normal 2^(1-5).
    assert (fmt.max, fmt.min_normal, fmt.epsilon) == (2 * (1 + 15 / 16), 2.0**-4, 2.0**-4)


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_repr_is_readable(name):
    fmt = formats.get(name)
    e, m, bias, specials = FORMAT_TABLE[name]
    text = repr(fmt)
    assert text.startswith("FloatFormat(")
    assert name in text
    assert f"1-{e}-{m}" in text
    assert f"bias={bias}" in text
    assert specials in text
    assert f"max={fmt.max:g}" in text


def test_repr_custom_and_dfp():
    text = repr(tfhfp8.FloatFormat(4, 3, bias=9, subnormals=False))
    assert "1-4-3" in text and "bias=9" in text and "subnormals" in text
    assert "max=" in text
    dfp = repr(tfhfp8.DynamicFixedPoint(bits=12, axis=-1))
    assert dfp.startswith("DynamicFixedPoint(") and "bits=12" in dfp and "-1" in dfp
    assert "per tensor" in repr(tfhfp8.DynamicFixedPoint())


# -- get() --------------------------------------------------------------------------

@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_get_by_name_and_ml_dtypes_dtype(name):
    fmt = formats.get(name)
    assert fmt.name == name
    assert formats.get(np_type(name)) == fmt
    assert formats.get(np.dtype(np_type(name))) == fmt


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_get_alias(alias):
    assert formats.get(alias) == formats.get(ALIASES[alias])
    assert formats.get(alias).name == ALIASES[alias]


def test_get_passes_formats_through():
    fmt = tfhfp8.FloatFormat(3, 2, bias=1, specials="finite")
    assert formats.get(fmt) is fmt
    dfp = tfhfp8.DynamicFixedPoint(8, axis=0)
    assert formats.get(dfp) is dfp


def test_get_dfp_by_name():
    dfp = formats.get("int16_dfp")
    assert isinstance(dfp, tfhfp8.DynamicFixedPoint)
    assert dfp.bits == 16 and dfp.axis is None and dfp.max_mantissa == 2**15 - 1


def test_get_config_dict():
    config = dict(exponent_bits=4, mantissa_bits=2, bias=9, specials="fnuz", subnormals=False)
    fmt = formats.get(config)
    assert isinstance(fmt, tfhfp8.FloatFormat)
    assert fmt == tfhfp8.FloatFormat(**config)
    assert formats.get({"bits": 10, "axis": 1}) == tfhfp8.DynamicFixedPoint(10, axis=1)


@pytest.mark.parametrize("fmt", [formats.get(n) for n in formats.names()]
                         + [tfhfp8.FloatFormat(**p) for p in CUSTOM]
                         + [tfhfp8.DynamicFixedPoint(9, axis=-2)], ids=repr)
def test_config_round_trip(fmt):
    config = fmt.get_config()
    restored = type(fmt).from_config(config)
    assert restored == fmt
    assert restored.name == fmt.name
    assert restored.get_config() == config
    assert formats.get(config) == fmt
    import json
    assert json.loads(json.dumps(config)) == config


@pytest.mark.parametrize("fmt", [formats.get(n) for n in formats.names()]
                         + [tfhfp8.FloatFormat(**p) for p in CUSTOM], ids=repr)
def test_serialize_round_trip(fmt):
    assert formats.get(formats.serialize(fmt)) == fmt


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        formats.get("float8_e9m9")
    message = str(info.value)
    assert "float8_e9m9" in message
    for name in formats.names():
        assert name in message


def test_get_rejects_other_types():
    with pytest.raises(TypeError):
        formats.get(3.5)


# -- invalid parameters -------------------------------------------------------------

def _assert_names_range(error, parameter, low, high):
    message = str(error.value)
    assert parameter in message
    numbers = [int(n) for n in re.findall(r"-?\d+", message)]
    assert low in numbers and high in numbers, message


@pytest.mark.parametrize("value", [0, 9, -1])
def test_exponent_bits_out_of_range(value):
    with pytest.raises(ValueError) as info:
        tfhfp8.FloatFormat(value, 3, specials="fnuz")
    _assert_names_range(info, "exponent_bits", 1, 8)


@pytest.mark.parametrize("value", [24, -1])
def test_mantissa_bits_out_of_range(value):
    with pytest.raises(ValueError) as info:
        tfhfp8.FloatFormat(4, value)
    _assert_names_range(info, "mantissa_bits", 0, 23)


def test_non_integer_bits_rejected():
    for bad in (2.5, "4", True, None):
        with pytest.raises(ValueError, match="exponent_bits"):
            tfhfp8.FloatFormat(bad, 3)
        with pytest.raises(ValueError, match="mantissa_bits"):
            tfhfp8.FloatFormat(4, bad)


@pytest.mark.parametrize("e,specials", [(5, "ieee"), (4, "fnuz"), (3, "fn"), (8, "ieee")])
def test_bias_range(e, specials):
    # Normal numbers must be float32 normals: 1 - bias >= -126 and top - bias <= 127,
    # top the largest exponent field that holds finite numbers.
    top = (1 << e) - 2 if specials == "ieee" else (1 << e) - 1
    low, high = top - 127, 127
    assert tfhfp8.FloatFormat(e, 2, bias=low, specials=specials).max < 2.0**128
    assert tfhfp8.FloatFormat(e, 2, bias=high, specials=specials).min_normal == 2.0**-126
    for bad in (low - 1, high + 1):
        with pytest.raises(ValueError) as info:
            tfhfp8.FloatFormat(e, 2, bias=bad, specials=specials)
        _assert_names_range(info, "bias", low, high)


def test_specials_bogus():
    with pytest.raises(ValueError) as info:
        tfhfp8.FloatFormat(4, 3, specials="bogus")
    message = str(info.value)
    assert "specials" in message and "bogus" in message
    for option in ("ieee", "fn", "fnuz", "finite"):
        assert option in message


def test_ieee_needs_two_exponent_bits():
    with pytest.raises(ValueError, match="exponent_bits"):
        tfhfp8.FloatFormat(1, 3, specials="ieee")


def test_subnormals_must_be_bool():
    with pytest.raises(ValueError, match="subnormals"):
        tfhfp8.FloatFormat(4, 3, subnormals="no")


@pytest.mark.parametrize("bits", [1, 25, 0])
def test_dfp_bits_out_of_range(bits):
    with pytest.raises(ValueError) as info:
        tfhfp8.DynamicFixedPoint(bits=bits)
    _assert_names_range(info, "bits", 2, 24)


def test_dfp_valid_bits():
    for bits in (2, 8, 16, 24):
        assert tfhfp8.DynamicFixedPoint(bits=bits).max_mantissa == 2 ** (bits - 1) - 1


def test_formats_are_immutable_and_hashable():
    fmt = formats.get("float8_e5m2")
    with pytest.raises(Exception):
        fmt.bias = 3
    assert len({fmt, formats.get("hfp8_bwd"), tfhfp8.FloatFormat(5, 2)}) == 1
