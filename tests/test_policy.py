"""tfhfp8.Policy: presets, keyword construction, overrides, validation, serialization
and the global policy."""

import inspect
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tfhfp8
from tfhfp8 import experiment, layers as tl
from tfhfp8.policy import ROLES

E4M3B11 = "float8_e4m3b11fnuz"
E5M2 = "float8_e5m2"
NE, SR = "nearest_even", "stochastic"

# What the preset comments and docstrings in tfhfp8/policy.py state, role by role:
# (format name or None for FP32, rounding).
PRESETS = {
    "float32": dict(weights=(None, NE), activations=(None, NE), errors=(None, NE),
                    weight_gradients=(None, NE), master_weights=(None, NE),
                    exempt_first_last=False),
    # Kalamkar et al.: GEMM inputs in BF16, RNE, FP32 accumulation and master weights.
    "bfloat16": dict(weights=("bfloat16", NE), activations=("bfloat16", NE),
                     errors=("bfloat16", NE), weight_gradients=(None, NE),
                     master_weights=(None, NE), exempt_first_last=False),
    # Wang / Mellempudi: 1-5-2 everywhere, SR on the backward tensors, FP16 master
    # weights updated with SR, first and last layers in 16 bits.
    "fp8": dict(weights=(E5M2, NE), activations=(E5M2, NE), errors=(E5M2, SR),
                weight_gradients=(E5M2, SR), master_weights=("float16", SR),
                exempt_first_last=True),
    # Sun et al.: 1-4-3 (bias 11) forward with RNE, 1-5-2 backward; weight gradients and
    # the update in 16 bits; SR of the errors and the update (Rodriguez, Wang et al.);
    # first and last layers in 16 bits.
    "hfp8": dict(weights=(E4M3B11, NE), activations=(E4M3B11, NE), errors=(E5M2, SR),
                 weight_gradients=("float16", NE), master_weights=("float16", SR),
                 exempt_first_last=True),
    # Das et al.: INT16 DFP GEMM inputs; FP32 accumulation, gradients, master weights.
    "int16_dfp": dict(weights=("int16_dfp", NE), activations=("int16_dfp", NE),
                      errors=("int16_dfp", NE), weight_gradients=(None, NE),
                      master_weights=(None, NE), exempt_first_last=False),
    # Transformer Engine DelayedScaling / Keras float8: per-tensor E4M3 forward, E5M2
    # backward, delayed scaling; FP32 gradients and master weights; nothing exempt.
    "fp8_delayed": dict(weights=("e4m3_delayed", NE), activations=("e4m3_delayed", NE),
                        errors=("e5m2_delayed", NE), weight_gradients=(None, NE),
                        master_weights=(None, NE), exempt_first_last=False),
    # fp8_delayed on an H100: its sums as cuBLAS' fast accumulation (forward) and split
    # accumulation (dgrad, wgrad), or promoted in all three GEMMs (DeepSeek-V3).
    "fp8_hopper": dict(weights=("e4m3_delayed", NE), activations=("e4m3_delayed", NE),
                       errors=("e5m2_delayed", NE), weight_gradients=(None, NE),
                       master_weights=(None, NE), exempt_first_last=False,
                       accumulation=("nvidia_hopper_fp8", "nvidia_hopper_fp8_promote128",
                                     "nvidia_hopper_fp8_promote128")),
    "fp8_hopper_promoted": dict(
        weights=("e4m3_delayed", NE), activations=("e4m3_delayed", NE),
        errors=("e5m2_delayed", NE), weight_gradients=(None, NE), master_weights=(None, NE),
        exempt_first_last=False, accumulation=("nvidia_hopper_fp8_promote128",) * 3),
    # DeepSeek-V3 as TE's Float8BlockScaling quantizes it (FP32 scales): E4M3 in 1 x 128
    # blocks and 128 x 128 weight tiles, BF16 optimizer moments, the output head (and
    # first GEMM layer) in FP32.
    "deepseek_v3_fp8": dict(
        weights=("e4m3_128x128", NE), activations=("e4m3_1x128", NE),
        errors=("e4m3_1x128", NE), weight_gradients=(None, NE), master_weights=(None, NE),
        optimizer_states=("bfloat16", NE), exempt_first_last=True, exempt_format=None),
    # Rouhani et al. 2023: MX operands in every GEMM, FP32 update; nothing exempt.
    "mxfp8": dict(weights=("mxfp8_e4m3", NE), activations=("mxfp8_e4m3", NE),
                  errors=("mxfp8_e5m2", NE), weight_gradients=(None, NE),
                  master_weights=(None, NE), exempt_first_last=False),
    # TE's MXFP8BlockScaling: E4M3 everywhere, E8M0 scales rounded up ("RCEIL").
    "mxfp8_cublas": dict(weights=("mxfp8_e4m3_rceil", NE), activations=("mxfp8_e4m3_rceil", NE),
                         errors=("mxfp8_e4m3_rceil", NE), weight_gradients=(None, NE),
                         master_weights=(None, NE), exempt_first_last=False),
    "mxfp6": dict(weights=("mxfp6_e3m2", NE), activations=("mxfp6_e3m2", NE),
                  errors=("mxfp6_e3m2", NE), weight_gradients=(None, NE),
                  master_weights=(None, NE), exempt_first_last=False),
    "mxfp4": dict(weights=("mxfp4_e2m1", NE), activations=("mxfp6_e3m2", NE),
                  errors=("mxfp6_e3m2", NE), weight_gradients=(None, NE),
                  master_weights=(None, NE), exempt_first_last=False),
    # NVIDIA's NVFP4 recipe: SR on gradients, last layers in BF16, FP32 update.
    "nvfp4": dict(weights=("nvfp4", NE), activations=("nvfp4", NE), errors=("nvfp4", SR),
                  weight_gradients=(None, NE), master_weights=(None, NE),
                  exempt_first_last=True, exempt_format="bfloat16"),
}


@pytest.fixture
def restore_global_policy():
    """Whatever a test sets as the global (Keras) dtype policy is undone afterwards."""
    before = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(before)


def format_name(fmt):
    return None if fmt is None else fmt.name


def test_preset_names():
    assert sorted(tfhfp8.policy.presets()) == sorted(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_formats_and_roundings(name):
    policy = tfhfp8.Policy(name)
    expected = PRESETS[name]
    assert policy.name == name
    for role in ROLES:
        fmt, rounding = expected.get(role, (None, NE))  # optimizer_states: none named
        assert format_name(policy.formats[role]) == fmt, role
        assert format_name(getattr(policy, role)) == fmt, role
        assert policy.rounding[role] == rounding, role
    assert policy.exempt_first_last is expected["exempt_first_last"]
    assert policy.saturate is True
    assert format_name(policy.exempt_format) == expected.get("exempt_format", "float16")
    assert policy.emulates is (name != "float32")
    sums = tuple(str(policy.accumulation[kind]) for kind in tfhfp8.gemm.GEMM_KINDS)
    assert sums == expected.get("accumulation", ("float32",) * 3)
    # Keras' side: a float32 DTypePolicy.
    assert isinstance(policy, keras.DTypePolicy)
    assert policy.compute_dtype == "float32" and policy.variable_dtype == "float32"


def test_loss_scaling_none_is_no_scaling():
    assert tfhfp8.Policy("hfp8", loss_scaling="none").loss_scaling is None
    for name in tfhfp8.policy.presets():  # saved files name presets: no state to add
        assert tfhfp8.Policy(name).loss_scaling is None


def test_preset_format_details():
    hfp8 = tfhfp8.Policy("hfp8")
    assert (hfp8.weights.exponent_bits, hfp8.weights.mantissa_bits, hfp8.weights.bias) == (4, 3, 11)
    assert hfp8.weights.max == 30.0
    assert (hfp8.errors.exponent_bits, hfp8.errors.mantissa_bits, hfp8.errors.bias) == (5, 2, 15)
    dfp = tfhfp8.Policy("int16_dfp").weights
    assert isinstance(dfp, tfhfp8.DynamicFixedPoint)
    assert dfp.bits == 16 and dfp.axis is None


@pytest.mark.parametrize("name", ["fp8", "hfp8"])
def test_exempt_layer_policy_is_16_bit(name):
    exempt = tfhfp8.Policy(name).for_exempt_layer()
    for role in ("weights", "activations", "errors"):
        assert format_name(exempt.formats[role]) == "float16", role
    assert exempt.weight_gradients is None and exempt.master_weights is None
    assert exempt.rounding == tfhfp8.Policy(name).rounding
    inference = tfhfp8.Policy(name).inference().for_exempt_layer()
    assert format_name(inference.weights) == "float16" and inference.errors is None


def test_keyword_construction():
    policy = tfhfp8.Policy(weights=E4M3B11, activations=E4M3B11, errors=E5M2)
    assert policy.name == "custom"
    assert format_name(policy.weights) == E4M3B11
    assert format_name(policy.activations) == E4M3B11
    assert format_name(policy.errors) == E5M2
    assert policy.weight_gradients is None and policy.master_weights is None
    assert policy.rounding == {role: NE for role in ROLES}
    assert policy.saturate is True
    # Aliases and format objects are accepted.
    fmt = tfhfp8.FloatFormat(4, 3, bias=9, specials="fnuz")
    alias = tfhfp8.Policy("mine", weights="hfp8_fwd", errors="hfp8_bwd", activations=fmt)
    assert alias.name == "mine"
    assert format_name(alias.weights) == E4M3B11 and format_name(alias.errors) == E5M2
    assert alias.activations == fmt


def test_custom_policy_exempts_nothing_by_default():
    policy = tfhfp8.Policy(weights=E4M3B11, activations=E4M3B11, errors=E5M2)
    assert policy.exempt_first_last is False
    # Also in quantize_model: every GEMM layer gets the custom policy.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="first"),
                              keras.layers.Dense(2, name="last")])
    emulated = tfhfp8.quantize_model(model, policy)
    assert [layer.policy for layer in emulated.layers] == [policy, policy]


def test_overrides_keep_the_rest_of_the_preset():
    policy = tfhfp8.Policy("hfp8", errors="float8_e5m2fnuz")
    assert policy.name == "hfp8"
    assert format_name(policy.errors) == "float8_e5m2fnuz"
    for role in ("weights", "activations", "weight_gradients", "master_weights"):
        assert format_name(policy.formats[role]) == PRESETS["hfp8"][role][0]
    assert policy.exempt_first_last is True
    assert policy != tfhfp8.Policy("hfp8")
    # "float32" forces FP32 for a role (None keeps the preset's choice).
    fp32_grads = tfhfp8.Policy("hfp8", weight_gradients="float32", master_weights=None)
    assert fp32_grads.weight_gradients is None
    assert format_name(fp32_grads.master_weights) == "float16"
    assert tfhfp8.Policy("hfp8", exempt_first_last=False).exempt_first_last is False
    assert tfhfp8.Policy("hfp8", exempt_format="bfloat16").exempt_format.name == "bfloat16"
    assert tfhfp8.Policy("hfp8", exempt_format=None).exempt_format is None
    assert tfhfp8.Policy("hfp8", saturate=False).saturate is False


def test_rounding_overrides():
    everywhere = tfhfp8.Policy("fp8", rounding=NE)
    assert everywhere.rounding == {role: NE for role in ROLES}
    assert format_name(everywhere.errors) == E5M2  # formats untouched
    # A dict: missing roles are round-to-nearest-even.
    partial = tfhfp8.Policy("hfp8", rounding={"errors": SR, "weights": "toward_zero"})
    assert partial.rounding == dict(weights="toward_zero", activations=NE, errors=SR,
                                    weight_gradients=NE, master_weights=NE,
                                    optimizer_states=NE)
    assert tfhfp8.Policy("fp8", rounding={"errors": SR}).rounding["weight_gradients"] == NE
    assert tfhfp8.Policy(errors=E5M2, rounding=SR).rounding["errors"] == SR


@pytest.mark.parametrize("kwargs, parameter", [
    (dict(rounding="nearest"), "rounding"),
    (dict(rounding={"errors": "up"}), "rounding"),
    (dict(rounding={"bias": NE}), "rounding"),
    (dict(rounding={"gradients": SR}), "rounding"),
    (dict(saturate="yes"), "saturate"),
    (dict(saturate=1), "saturate"),
    (dict(weights="float8_e9m9"), "weights"),
    (dict(activations="int8"), "activations"),
    (dict(errors="e5m2"), "errors"),
    (dict(weight_gradients="half"), "weight_gradients"),
    (dict(master_weights="fp16"), "master_weights"),
    (dict(exempt_format="float12"), "exempt_format"),
    (dict(loss_scaling="sometimes"), "loss_scaling"),
])
def test_invalid_arguments_raise_value_error_naming_the_parameter(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        tfhfp8.Policy("hfp8", **kwargs)


def test_invalid_types():
    with pytest.raises(TypeError, match="rounding"):
        tfhfp8.Policy(rounding=3)
    with pytest.raises(TypeError, match="name"):
        tfhfp8.Policy(16)
    with pytest.raises(TypeError, match="weights"):
        tfhfp8.Policy(weights=8)


def test_unknown_preset_name_via_get():
    with pytest.raises(ValueError, match="hfp9"):
        tfhfp8.policy.get("hfp9")
    with pytest.raises(ValueError, match="hfp9"):
        tfhfp8.set_global_policy("hfp9")


ROUND_TRIP = [
    *[tfhfp8.Policy(name) for name in PRESETS],
    tfhfp8.Policy("hfp8", errors="float8_e5m2fnuz", weight_gradients="float32"),
    tfhfp8.Policy("fp8", rounding={"errors": SR}, exempt_first_last=False),
    tfhfp8.Policy("mine", weights=tfhfp8.FloatFormat(4, 3, bias=9, specials="fnuz"),
                  activations=tfhfp8.DynamicFixedPoint(bits=12, axis=-1),
                  errors="bfloat16", rounding="toward_zero", saturate=False,
                  exempt_format=None),
    tfhfp8.Policy("hfp8", loss_scaling="adaptive"),
]


@pytest.mark.parametrize("policy", ROUND_TRIP, ids=lambda p: repr(p)[16:60])
def test_config_round_trip(policy):
    config = policy.get_config()
    restored = tfhfp8.Policy.from_config(config)
    assert restored == policy
    assert restored.name == policy.name
    for role in ROLES:
        assert restored.formats[role] == policy.formats[role], role
    assert restored.rounding == policy.rounding
    assert restored.exempt_format == policy.exempt_format
    # Through JSON text.
    text = json.dumps(config)
    again = tfhfp8.Policy.from_config(json.loads(text))
    assert again == policy and again.get_config() == config
    # Through Keras' serialization.
    keras_config = keras.saving.serialize_keras_object(policy)
    assert keras.saving.deserialize_keras_object(json.loads(json.dumps(keras_config))) == policy


def test_from_config_roles_none_are_fp32_even_for_a_preset_name():
    policy = tfhfp8.Policy("hfp8", weight_gradients="float32")
    restored = tfhfp8.Policy.from_config(json.loads(json.dumps(policy.get_config())))
    assert restored.weight_gradients is None
    assert restored.exempt_first_last is True


@pytest.mark.parametrize("policy", ["hfp8", tfhfp8.Policy("hfp8", errors="float8_e5m2fnuz")],
                         ids=["preset", "custom"])
def test_layer_config_round_trip(policy):
    layer = tl.Dense(3, policy=policy)
    config = json.loads(json.dumps(layer.get_config()))
    restored = tl.Dense.from_config(config)
    assert restored.policy == tfhfp8.policy.get(policy)
    # A preset is stored by name, anything else as its config.
    assert config["policy"] == ("hfp8" if policy == "hfp8" else tfhfp8.policy.get(policy).get_config())


def test_global_policy_default_is_float32(restore_global_policy):
    keras.config.set_dtype_policy("float32")
    assert tfhfp8.global_policy() == tfhfp8.Policy("float32")
    # A plain Keras policy is not ours: float32 emulation.
    keras.config.set_dtype_policy("mixed_bfloat16")
    assert tfhfp8.global_policy() == tfhfp8.Policy("float32")


def _uses(layer, x, policy):
    """The layer's output is the one of a layer built with `policy=policy` explicitly."""
    twin = type(layer).from_config({**layer.get_config(), "policy": policy})
    twin(x)
    twin.set_weights(layer.get_weights())
    np.testing.assert_array_equal(layer(x).numpy(), twin(x).numpy())


@pytest.mark.parametrize("how", ["tfhfp8.set_global_policy", "keras.config.set_dtype_policy"])
def test_global_policy_is_picked_up(how, restore_global_policy):
    policy = tfhfp8.Policy("hfp8", errors="float8_e5m2fnuz")
    if how == "tfhfp8.set_global_policy":
        tfhfp8.set_global_policy(policy)
    else:
        keras.config.set_dtype_policy(policy)
    assert tfhfp8.global_policy() == policy
    assert keras.config.dtype_policy() == policy
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    layer = tl.Dense(5)
    y = layer(x)
    assert layer.policy == policy
    # Keras' own dtype policy of the layer stays a plain float32 one.
    assert layer.dtype_policy.name == "float32" and y.dtype == "float32"
    assert "policy" in layer.get_config()
    _uses(layer, x, policy)
    # It does quantize: differs from an FP32 layer with the same weights.
    plain = keras.layers.Dense(5, dtype="float32")
    plain(x)
    plain.set_weights(layer.get_weights())
    assert not np.allclose(plain(x).numpy(), y.numpy(), rtol=1e-4, atol=1e-4)
    # Plain Keras layers still work under it.
    assert keras.layers.LayerNormalization()(x).dtype == "float32"


def test_global_policy_by_preset_name(restore_global_policy):
    tfhfp8.set_global_policy("int16_dfp")
    assert tfhfp8.global_policy() == tfhfp8.Policy("int16_dfp")
    layer = tl.Conv2D(2, 3)
    layer(np.ones((1, 5, 5, 3), "float32"))
    assert layer.policy == tfhfp8.Policy("int16_dfp")
    tfhfp8.set_global_policy(tfhfp8.Policy("float32"))
    assert tl.Dense(2).policy == tfhfp8.Policy("float32")


def test_explicit_policy_beats_global(restore_global_policy):
    tfhfp8.set_global_policy("hfp8")
    assert tl.Dense(2, policy="bfloat16").policy == tfhfp8.Policy("bfloat16")


def test_no_global_policy_leaks_between_tests():
    """Tests that set a global policy restore it (fixture): none is left set here."""
    assert keras.config.dtype_policy().name == "float32"
    assert tfhfp8.global_policy() == tfhfp8.Policy("float32")


def test_inference_policy_drops_backward_roles():
    policy = tfhfp8.Policy("hfp8").inference()
    assert format_name(policy.weights) == E4M3B11 and format_name(policy.activations) == E4M3B11
    assert policy.errors is None and policy.weight_gradients is None
    assert policy.master_weights is None


@pytest.mark.parametrize("name", ["hfp9", "HFP8", "fp8 ", "bf16", "custom_fp8"])
def test_unknown_name_without_role_keywords_raises_listing_the_presets(name):
    # A misspelt preset used to build a float32 policy that emulates nothing.
    with pytest.raises(ValueError, match=r"not a preset \(float32, bfloat16, fp8, hfp8, "
                                         r"int16_dfp, fp8_delayed, fp8_hopper, "
                                         r"fp8_hopper_promoted, deepseek_v3_fp8, mxfp8, "
                                         r"mxfp8_cublas, mxfp6, mxfp4, nvfp4\)"):
        tfhfp8.Policy(name)
    with pytest.raises(ValueError, match="not a preset"):
        tfhfp8.Policy(name, rounding="stochastic", exempt_first_last=True)
    # With a role it is a custom policy; derived and default names still work.
    assert tfhfp8.Policy(name, errors="float8_e5m2").errors.name == "float8_e5m2"
    assert not tfhfp8.Policy().emulates
    assert tfhfp8.Policy("float32").inference().name == "float32/inference"
    assert tfhfp8.Policy("hfp8", exempt_format=None).for_exempt_layer().weights is None


def test_hfp8_preset_is_what_the_ablation_measured_as_the_sources_recipe():
    # docs/results.md justifies the preset with the ablation's `hfp8_sources` runs. In a
    # subprocess: the script defines absl flags that tfhfp8.cli defines too.
    script = ("import json; from models.policy_comparison import hfp8_ablation as a; "
              "policy, scaling = a._variants()['hfp8_sources']; "
              "print(json.dumps([policy.get_config(), scaling]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured, loss_scaling = json.loads(result.stdout.strip().splitlines()[-1])
    preset = tfhfp8.Policy("hfp8").get_config()
    preset.pop("name"), measured.pop("name")
    assert preset == measured
    assert loss_scaling == inspect.signature(
        experiment.train_policies).parameters["loss_scaling"].default
