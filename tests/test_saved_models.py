"""`.keras` files saved by an earlier tfhfp8 still load, with identical predictions.

The fixtures in `tests/data/` were saved by `tests/data/make_legacy_fixtures.py` from
main at commit c3b3f7f (before the issue-12 restructuring), with TensorFlow 2.18.1 and
Keras 3.9.0, the lower bound of the supported versions (.ci/oldest.txt): Keras reads
files written by an older Keras but not by a newer one, so fixtures saved at the lower
bound load on every version `make test` and `make test-oldest` cover. An `hfp8` CNN with
adaptive loss scaling (Conv2D, BatchNormalization, Dense; first and last GEMM exempt)
and a MultiHeadAttention model, both trained a few steps so that their error scales,
BatchNorm statistics and optimizer state differ from their initial values.
"""

import json
import os

import keras
import numpy as np
import pytest

import tfhfp8

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _emulated_layers(layer):
    """Every emulated layer in `layer` (depth first, MultiHeadAttention projections too)."""
    found = [layer] if isinstance(layer, tfhfp8.layers.EmulatedLayer) else []
    for sub in getattr(layer, "layers", []):
        found += _emulated_layers(sub)
    if isinstance(layer, keras.layers.MultiHeadAttention):
        for sub in (layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense):
            found += _emulated_layers(sub)
    return found


@pytest.mark.parametrize("name", ["legacy_cnn_hfp8", "legacy_mha_hfp8"])
def test_legacy_keras_file_loads_with_identical_predictions(name):
    model = keras.saving.load_model(os.path.join(DATA, name + ".keras"))
    expected = np.load(os.path.join(DATA, name + ".npz"))
    with open(os.path.join(DATA, name + ".json")) as f:
        saved = json.load(f)

    np.testing.assert_array_equal(model.predict(expected["x"], verbose=0), expected["y"])

    layers = {layer.name: layer for layer in _emulated_layers(model)}
    assert {n: layer.policy.name for n, layer in layers.items()} == saved["policies"]
    state = {f"{n}/{gemm}/{key}": float(variable.numpy())
             for n, layer in layers.items()
             for gemm, variables in layer.error_state.items()
             for key, variable in variables.items()}
    assert state == saved["error_state"]
    assert model.optimizer is not None and model.optimizer.iterations.numpy() > 0


def test_legacy_keras_file_trains_on():
    model = keras.saving.load_model(os.path.join(DATA, "legacy_cnn_hfp8.keras"))
    x = np.load(os.path.join(DATA, "legacy_cnn_hfp8.npz"))["x"]
    before = model.predict(x, verbose=0)
    model.fit(x, np.zeros(len(x), "int64"), epochs=1, verbose=0)
    assert not np.array_equal(model.predict(x, verbose=0), before)
