"""The per-operation choice of backend: the C++ kernels on CPU, except for the
operations that XLA's fusion of the TF-ops code measured faster on the CPU variant in
use (tfhfp8.ops.XLA_FASTER). The logic, not the timings (benchmarks/ has those)."""

import numpy as np
import pytest
import tensorflow as tf

import tfhfp8
from tfhfp8 import ops
from tfhfp8.ops import cpp_backend

from helpers import assert_same_bits

LARGE = 1 << 16  # ops._FUSE_MIN_ELEMENTS: fused by XLA from this size on


@pytest.fixture
def cpu_only(monkeypatch):
    """The choice as on a CPU without a forced backend."""
    monkeypatch.delenv("TFHFP8_BACKEND", raising=False)
    if ops.backend_info()["backend"] != "cpp":
        pytest.skip("the C++ kernels are not the default here (GPU, or no build)")
    return ops.backend_info()["cpu_variant"]


def test_the_measured_operations_take_the_xla_path(cpu_only, monkeypatch):
    monkeypatch.setattr(ops, "XLA_FASTER", frozenset({(cpu_only, "float", "stochastic")}))
    assert ops.active_backend("float", "stochastic", LARGE) is ops._fused
    assert ops.active_backend("float", "nearest_even", LARGE) is cpp_backend
    assert ops.active_backend("dfp", "stochastic", LARGE) is cpp_backend
    assert ops.backend_info()["xla_faster"] == ["float stochastic"]


def test_small_or_unknown_sizes_stay_on_cpp(cpu_only, monkeypatch):
    # Below the fusion size (or of unknown size) the TF-ops code would run op by op.
    monkeypatch.setattr(ops, "XLA_FASTER", frozenset({(cpu_only, "float", "stochastic")}))
    assert ops.active_backend("float", "stochastic", LARGE - 1) is cpp_backend
    assert ops.active_backend("float", "stochastic", None) is cpp_backend
    assert ops.active_backend() is cpp_backend


def test_another_variants_entries_do_not_apply(cpu_only, monkeypatch):
    other = "x86_64_v4" if cpu_only != "x86_64_v4" else "x86_64_v3"
    monkeypatch.setattr(ops, "XLA_FASTER", frozenset({(other, "float", "stochastic")}))
    assert ops.active_backend("float", "stochastic", LARGE) is cpp_backend
    assert ops.backend_info()["xla_faster"] == []


def test_the_forced_variant_is_the_one_looked_up(cpu_only, monkeypatch):
    monkeypatch.setattr(ops, "XLA_FASTER", frozenset({("baseline", "float", "nearest_even")}))
    monkeypatch.setenv("TFHFP8_CPU_VARIANT", "baseline")
    assert ops.active_backend("float", "nearest_even", LARGE) is ops._fused
    monkeypatch.setenv("TFHFP8_CPU_VARIANT", "auto")
    expected = ops._fused if cpu_only == "baseline" else cpp_backend
    assert ops.active_backend("float", "nearest_even", LARGE) is expected


def test_a_forced_backend_overrides_the_table(cpu_only, monkeypatch):
    monkeypatch.setattr(ops, "XLA_FASTER", frozenset({(cpu_only, "float", "stochastic")}))
    monkeypatch.setenv("TFHFP8_BACKEND", "cpp")
    assert ops.active_backend("float", "stochastic", LARGE) is cpp_backend


@pytest.mark.parametrize("fmt,operation", [("float8_e4m3fn", "float"), ("int16_dfp", "dfp"),
                                           ("mxfp8_e4m3", "block")])
def test_quantize_names_its_operation_and_gives_the_same_bits(cpu_only, monkeypatch, fmt,
                                                               operation):
    x = tf.constant(np.random.default_rng(0).standard_normal(LARGE).astype(np.float32))
    monkeypatch.setattr(ops, "XLA_FASTER", frozenset())
    on_cpp = tfhfp8.quantize(x, fmt, "stochastic", True, 5).numpy()
    monkeypatch.setattr(ops, "XLA_FASTER", frozenset({(cpu_only, operation, "stochastic")}))
    chosen = []
    original = ops.active_backend
    monkeypatch.setattr(ops, "active_backend",
                        lambda *args: chosen.append(original(*args)) or chosen[-1])
    assert_same_bits(tfhfp8.quantize(x, fmt, "stochastic", True, 5).numpy(), on_cpp, x.numpy(),
                     fmt)
    assert chosen == [ops._fused]
