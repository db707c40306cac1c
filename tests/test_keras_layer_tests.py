"""Keras' own tests of the layer types tfhfp8 emulates, run against tfhfp8's layers.

Each Keras test file that ships with the installed Keras (Keras 3.15's wheel has them,
3.9's none: there every file is skipped, with the reason) is loaded once per
policy as a fresh copy of its module in which the name `layers` is Keras' layers with
tfhfp8's classes in place of the emulated ones, so that classes bound when the module
is imported (in `parameterized` arguments) are tfhfp8's as well. Its test classes are
collected here under `<policy>_<class>`.

- float32: tfhfp8's layers run their own code (`call` through `EmulatedLayer.emulated_gemm`, the
  attention products through `compute_attention`) with every rounding an identity,
  so Keras' checks against its NumPy references hold as they stand.
- hfp8 (weights and activations in E4M3 bias 11, errors in E5M2 with stochastic
  rounding, FP16 master weights): 8-bit results differ from Keras' FP32 references by
  far more than the tolerances of its correctness cases, which do not apply; every
  other case (shapes, dtypes, masks, mixed precision, configs, saving, training steps,
  LoRA, results compared between two calls of the same layer, Keras' errors) applies.

Size: 1375 cases collected, 469 run (about half under each policy), 155 s of CPU time
with `-n 2` on the 2-core Intel Xeon (6 min of wall time there while shared, at a load of
10), oneDNN on or off alike; `-k "not hfp8_"` halves it.
"""

import fnmatch
import importlib.util
import sys
import types
import unittest

import keras
import pytest
from keras.src import layers as keras_layers

import tfhfp8

_KERAS_QUANTIZE = ("Keras' quantize() (int8, int4, float8, GPTQ, AWQ) refuses subclasses of "
                   "its layers (NotImplementedError); tfhfp8's layers quantize by policy")

# The cases that do not apply (`Class.method` pattern -> why), under every policy: Keras'
# quantize() (its cases that expect its errors on a subclass, an unbuilt layer or an
# invalid mode, or build a layer from a quantized dtype policy, apply), and the layer
# types tfhfp8 does not emulate.
NOT_APPLYING = {
    **{f"*.{pattern}": _KERAS_QUANTIZE for pattern in (
        "test_quantize", "test_quantize_int*", "test_quantize_float8*",
        "test_quantize_by_setting_dtype_policy*", "test_quantize_when_already_quantized*",
        "test_quantize_lora_integration*", "test_quantize_with_specific_equations*",
        "test_*quantize_config*", "test_*_custom_quantizer", "test_*_weight_only_quantizer",
        "test_einsum_dense_quantize*", "test_int4_*", "test_gptq_*", "test_awq_*")},
    "EinsumDenseTest.test_analyze_einsum_string*": "tests a Keras helper, no layer",
    "*.test_conv1d_transpose*": "Keras' Conv1DTranspose, not emulated",
    "*.test_conv3d_transpose*": "Keras' Conv3DTranspose, not emulated",
    "*.test_depthwise_conv1d*": "Keras' DepthwiseConv1D, not emulated",
    "*.test_separable_conv1d*": "Keras' SeparableConv1D, not emulated",
}

# Keras' test modules under keras.src.layers.
KERAS_TEST_FILES = (
    "core.dense_test", "core.einsum_dense_test", "core.embedding_test",
    "convolutional.conv_test", "convolutional.conv_transpose_test",
    "convolutional.depthwise_conv_test", "convolutional.separable_conv_test",
    "attention.multi_head_attention_test")

_NUMERIC = "compares with a NumPy FP32 reference within 1e-5 or less"
_8_BIT = {
    "*CorrectnessTest.*": _NUMERIC,
    "MultiHeadAttentionTest.test_correctness*": _NUMERIC,
    "*.test_*_constraints": "the policy's FP16 master-weight rounding wraps the "
                            "constraint (MasterWeightRounding(inner=NonNeg()))",
    "DenseTest.test_dense_sparse": "known gap: tfhfp8 quantizes dense tensors only, a "
                                   "tf.SparseTensor input fails under a quantizing policy",
}

# Label -> (policy, the further cases that do not apply under it).
POLICIES = {
    "float32": ("float32", {}),
    "hfp8": ("hfp8", _8_BIT),
}


def _substitutes(label, policy):
    """The emulated classes by Keras name; under a policy other than float32, each a
    subclass whose `policy` defaults to it (registered, so saved models load)."""
    classes = {keras_cls.__name__: cls for keras_cls, cls in tfhfp8.layers.EMULATED.items()}
    if policy == "float32":
        return classes

    def with_policy(cls):
        def __init__(self, *args, policy=policy, **kwargs):
            cls.__init__(self, *args, policy=policy, **kwargs)

        subclass = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__})
        return keras.saving.register_keras_serializable(f"tfhfp8_test_{label}")(subclass)

    return {name: with_policy(cls) for name, cls in classes.items()}


class _Layers(types.ModuleType):
    """`keras.src.layers` with some of its classes replaced."""

    def __init__(self, substitutes):
        super().__init__(keras_layers.__name__)
        self.__dict__.update(substitutes)

    def __getattr__(self, name):
        return getattr(keras_layers, name)


def _load(name, label, policy):
    """A fresh copy of Keras' test module `keras.src.layers.<name>` whose `layers` has
    the substitutes of `policy`, or None when this Keras ships no such file."""
    original = f"keras.src.layers.{name}"
    if importlib.util.find_spec(original) is None:
        return None
    # Import the original first, so that every module it imports is loaded with Keras'
    # own `layers` before the copy's imports run with ours.
    spec = importlib.import_module(original).__spec__
    alias = f"{__name__}.{label}.{name}"
    copy_spec = importlib.util.spec_from_file_location(alias, spec.origin)
    module = importlib.util.module_from_spec(copy_spec)
    package = sys.modules["keras.src"]
    # `from keras.src import layers` reads the package's attribute.
    package.layers = _Layers(_substitutes(label, policy))
    try:
        copy_spec.loader.exec_module(module)
    finally:
        package.layers = keras_layers
    sys.modules[alias] = module
    return module


def _skip(test_class, rules):
    """Marks the test methods of `test_class` whose `Class.method` matches a pattern of
    `rules` skipped, with its reason."""
    for attribute in dir(test_class):
        if not attribute.startswith("test"):
            continue
        for pattern, reason in rules.items():
            if fnmatch.fnmatchcase(f"{test_class.__name__}.{attribute}", pattern):
                method = getattr(test_class, attribute)
                setattr(test_class, attribute, unittest.skip(reason)(method))
                break


def _collect():
    """Loads every test file under every policy and collects its test classes here.
    Returns the copies of the test modules and the files this Keras lacks."""
    loaded, missing = [], []
    for label, (policy, policy_rules) in POLICIES.items():
        for name in KERAS_TEST_FILES:
            module = _load(name, label, policy)
            if module is None:
                missing.append(name)
                continue
            loaded.append(module)
            for attribute, value in vars(module).items():
                if (isinstance(value, type) and issubclass(value, unittest.TestCase)
                        and value.__module__ == module.__name__):
                    _skip(value, {**NOT_APPLYING, **policy_rules})
                    globals()[f"{label}_{attribute}"] = value
    return loaded, sorted(set(missing))


LOADED, MISSING = _collect()


def test_the_copies_use_the_emulated_layers():
    """Every copy reaches Keras' layers through the substituted `layers` (a Keras test
    file that imported them otherwise would silently test Keras' own classes)."""
    if not LOADED:
        pytest.skip(f"Keras {keras.__version__} ships none of the test files")
    for module in LOADED:
        assert isinstance(module.layers, _Layers), module.__name__
        for keras_cls, cls in tfhfp8.layers.EMULATED.items():
            substitute = getattr(module.layers, keras_cls.__name__)
            assert issubclass(substitute, cls), (module.__name__, substitute)


if MISSING:
    @pytest.mark.parametrize("name", MISSING)
    def test_keras_ships_the_test_file(name):
        pytest.skip(f"Keras {keras.__version__} ships no keras/src/layers/"
                    f"{name.replace('.', '/')}.py")
