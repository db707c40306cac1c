"""Emulated accumulation: the Accumulator, tfhfp8.matmul on both backends, against an
independent sequential reference (fractions) and apytypes."""

import keras
import pytest

import tfhfp8
from tfhfp8 import accumulation


# -- the Accumulator ------------------------------------------------------------------
@pytest.mark.parametrize("name", accumulation.names())
def test_named_accumulators_round_trip(name):
    acc = accumulation.get(name)
    assert accumulation.serialize(acc) == name
    assert accumulation.get(accumulation.serialize(acc)) == acc


def test_named_accumulators_are_what_they_say():
    assert accumulation.get("float32").kind == "float32"
    assert accumulation.get("float16").format == tfhfp8.formats.get("float16")
    assert accumulation.get("float16_chunk64") == tfhfp8.Accumulator("float16", chunk_size=64)
    assert accumulation.get("int32") == tfhfp8.Accumulator("int32", overflow="wrap")


@pytest.mark.parametrize("acc", [
    tfhfp8.Accumulator("float8_e5m2", chunk_size=16, rounding="stochastic",
                       outer_format="float16", products="bfloat16", saturate=True),
    tfhfp8.Accumulator(tfhfp8.FloatFormat(6, 9), chunk_size=3),
    tfhfp8.Accumulator("int32", chunk_size=8, overflow="saturate"),
])
def test_custom_accumulators_round_trip(acc):
    config = accumulation.serialize(acc)
    assert isinstance(config, dict)
    assert accumulation.get(config) == acc
    assert keras.saving.deserialize_keras_object(config) == acc


@pytest.mark.parametrize("kwargs, parameter", [
    (dict(format="float32", chunk_size=3), "chunk_size"),
    (dict(format="int32", rounding="stochastic"), "rounding"),
    (dict(format="int32", overflow="clamp"), "overflow"),
    (dict(format="float16", overflow="wrap"), "overflow"),
    (dict(format=tfhfp8.FloatFormat(8, 23)), "format"),
    (dict(format="int16_dfp"), "format"),
    (dict(format="float16", chunk_size=0), "chunk_size"),
    (dict(format="float16", chunk_size=2.5), "chunk_size"),
    (dict(format="float16", rounding="up"), "rounding"),
    (dict(format="float16", outer_format="float32"), "outer_format"),
    (dict(format="float16", products="nope"), "products"),
    (dict(format="float16", saturate=1), "saturate"),
])
def test_bad_arguments_name_the_parameter(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        tfhfp8.Accumulator(**kwargs)


def test_accumulator_is_frozen():
    acc = tfhfp8.Accumulator("float16")
    with pytest.raises(Exception):
        acc.chunk_size = 4
