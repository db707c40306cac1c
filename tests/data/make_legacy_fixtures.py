"""Saves the legacy .keras fixtures (run once, from main at c3b3f7f).

Run with the oldest supported versions (.ci/oldest.txt: TensorFlow 2.18.1, Keras 3.9.0),
so that every supported Keras can read the files:
`git archive c3b3f7f | tar -x -C /tmp/old && cd /tmp/old && PYTHONPATH=/tmp/old
<oldest venv>/bin/python <this file> <output directory>`.
"""
import os, sys
import numpy as np
import keras
import tfhfp8

out = sys.argv[1]
keras.utils.set_random_seed(0)
policy = tfhfp8.Policy("hfp8", loss_scaling="adaptive")

# A CNN: Conv2D + BatchNorm + Dense, converted with quantize_model (first/last exempt).
inp = keras.Input((8, 8, 1))
x = keras.layers.Conv2D(4, 3, name="conv")(inp)
x = keras.layers.BatchNormalization(name="bn")(x)
x = keras.layers.ReLU()(x)
x = keras.layers.Conv2D(4, 3, name="conv2")(x)
x = keras.layers.Flatten()(x)
x = keras.layers.Dense(8, activation="relu", name="dense")(x)
outp = keras.layers.Dense(3, name="logits")(x)
cnn = tfhfp8.quantize_model(keras.Model(inp, outp), policy)
cnn.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            loss_weights=1e-7)   # tiny errors: the adaptive scales rise above 1
rng = np.random.default_rng(0)
xs = rng.normal(size=(16, 8, 8, 1)).astype("float32")
ys = rng.integers(0, 3, size=16)
cnn.fit(xs, ys, epochs=2, batch_size=8, verbose=0)   # scales and BN statistics move
cnn.save(os.path.join(out, "legacy_cnn_hfp8.keras"))
np.savez(os.path.join(out, "legacy_cnn_hfp8.npz"), x=xs[:4], y=cnn.predict(xs[:4], verbose=0))

# A MultiHeadAttention model built from tfhfp8 layers directly (custom policy, loss scaling).
tok = keras.Input((5, 8))
h = tfhfp8.layers.MultiHeadAttention(num_heads=2, key_dim=4, policy=policy, name="mha")(tok, tok)
h = keras.layers.LayerNormalization()(h)
h = tfhfp8.layers.Dense(4, policy="fp8", name="head")(h)
mha = keras.Model(tok, h)
mha.compile("adam", "mse", loss_weights=1e-7)
xt = rng.normal(size=(8, 5, 8)).astype("float32")
mha.fit(xt, rng.normal(size=(8, 5, 4)).astype("float32"), epochs=1, batch_size=4, verbose=0)
mha.save(os.path.join(out, "legacy_mha_hfp8.keras"))
np.savez(os.path.join(out, "legacy_mha_hfp8.npz"), x=xt[:3], y=mha.predict(xt[:3], verbose=0))
print(cnn.summary(), mha.summary())

def scales(model):
    out = {}
    for layer in model._flatten_layers():
        for gemm, state in getattr(layer, "error_state", {}).items():
            for key, v in state.items():
                out[f"{layer.name}/{gemm}/{key}"] = float(v.numpy())
    return out
import json
for name, m in (("cnn", cnn), ("mha", mha)):
    with open(os.path.join(out, f"legacy_{name}_hfp8.json"), "w") as f:
        json.dump({"error_state": scales(m),
                   "policies": {l.name: l.policy.name for l in m._flatten_layers()
                                if isinstance(l, tfhfp8.layers.EmulatedLayer)}}, f, indent=1, sort_keys=True)
