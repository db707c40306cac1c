"""Writes tests/data/legacy_fp8_mlp.{keras,npz}: run with PYTHONPATH at a tfhfp8 checkout
(68b72e5 for the committed files: before the stochastic-rounding step counter), with the
oldest supported versions (.ci/oldest.txt: TensorFlow 2.18.1, Keras 3.9.0), so that every
supported Keras can read the file (Keras does not read files written by a newer Keras).

    python tests/data/make_legacy_fp8_fixture.py tests/data/legacy_fp8_mlp
"""
import numpy as np, keras, tfhfp8, sys
out = sys.argv[1]
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(24, 4)).astype("float32"); labels = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0)
model = keras.Sequential([keras.Input((4,)), tfhfp8.layers.Dense(8, policy="fp8", activation="relu"),
                          tfhfp8.layers.Dense(3, policy="fp8")])
model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, labels, batch_size=8, epochs=1, verbose=0)
model.save(out + ".keras")
np.savez(out + ".npz", x=x, y=model.predict(x, verbose=0), labels=labels)
