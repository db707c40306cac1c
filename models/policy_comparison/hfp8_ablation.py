"""Which part of the hfp8 preset costs accuracy? One change at a time, same initial weights.

    .venv/bin/python -m models.policy_comparison.hfp8_ablation --output_dir=results/hfp8_ablation

Trains ResNet-20 on the full Fashion-MNIST exactly as the `resnet20_fashion_mnist_full`
runs of docs/results.md (same seed: same initial weights and data order; those runs give
the float32 and `hfp8` rows), under variants of the `hfp8` preset that each change one
thing: stochastic rounding of the errors, FP32 master weights, or the forward formats
alone (errors, weight gradients and master weights in FP32). Prints the table of
`tfhfp8 train` and writes results.json.

With --range_check it instead trains ResNet-20 in FP32 for one epoch on 10,000 images
and prints, for the input and the kernel of every GEMM layer, how much of it falls
outside the range of 1-4-3 bias 11 (max 30, smallest subnormal 2^-13).
"""

import keras
import numpy as np
from absl import app, flags

from tfhfp8 import Policy, datasets, experiment, formats, models

_EPOCHS = flags.DEFINE_integer("epochs", 1, "Training epochs per policy.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial weights and shuffling.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/hfp8_ablation",
                                  "Folder for results.json and curves.png.")
_RANGE_CHECK = flags.DEFINE_boolean("range_check", False,
                                    "Print the range check instead of training the variants.")

_FORWARD = dict(weights="float8_e4m3b11fnuz", activations="float8_e4m3b11fnuz",
                exempt_first_last=True)
_HFP8 = dict(_FORWARD, errors="float8_e5m2", weight_gradients="float16",
             master_weights="float16")


def variants():
    return [
        Policy("hfp8_sr_errors", **_HFP8, rounding={"errors": "stochastic"}),
        Policy("hfp8_fp32_master", **dict(_HFP8, master_weights=None)),
        Policy("hfp8_forward_only", **_FORWARD),
    ]


def range_check():
    fmt = formats.get("hfp8_fwd")
    keras.utils.set_random_seed(_SEED.value)
    (x, y), (x_test, _) = datasets.fashion_mnist(limit=10000, test_limit=256)
    model = models.resnet20(input_shape=x.shape[1:], num_classes=10)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=128, verbose=0)
    gemms = [layer for layer in model.layers
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    inputs = keras.Model(model.inputs, [layer.input for layer in gemms]).predict(
        x_test, verbose=0)
    print(f"{'layer':<28} {'max|x|':>7} {'|x|>max':>8} {'0<|x|<min':>10} {'max|w|':>7} "
          f"{'|w|<min':>8}   (1-4-3 bias 11: max {fmt.max:g}, min {fmt.min_subnormal:g})")
    for layer, x_in in zip(gemms, inputs):
        a, w = np.abs(x_in), np.abs(layer.kernel.numpy())
        nonzero = a[a > 0]
        print(f"{layer.name:<28} {a.max():7.2f} {np.mean(a > fmt.max):8.1e} "
              f"{np.mean(nonzero < fmt.min_subnormal):10.1e} {w.max():7.3f} "
              f"{np.mean(w < fmt.min_subnormal):8.1e}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _RANGE_CHECK.value:
        range_check()
        return
    results = experiment.train_policies(
        "resnet20", "fashion_mnist", variants(), epochs=_EPOCHS.value, batch_size=128,
        seed=_SEED.value, output_dir=_OUTPUT_DIR.value, verbose=2)
    print()
    print(experiment.table(results))


if __name__ == "__main__":
    app.run(main)
