r"""One ResNet-20 training step with emulated FP16 sums against FP32 sums.

    TF_NUM_INTRAOP_THREADS=1 python -m models.accumulation.step_time --batch_size 32

Times `model.train_on_batch` of `tfhfp8.quantize_model(resnet20, Policy("fp8",
accumulation=...))` on random 28x28x1 images, after one warm-up step (compilation),
and prints the median of `--steps` steps per accumulation, with the backend in use.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import keras  # noqa: E402

import tfhfp8  # noqa: E402
from tfhfp8 import models  # noqa: E402

_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per accumulation.")
_ACCUMULATIONS = flags.DEFINE_list("accumulations", "float32,float16,float16_chunk64",
                                   "Accumulators to compare (fp8 operands).")


def main(argv):
    del argv
    info = tfhfp8.ops.backend_info()
    print(f"accumulation kernels: {tfhfp8.ops.accumulation_backend()} "
          f"({info.get('cpu_variant', '')}); batch {_BATCH.value}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(_BATCH.value, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, _BATCH.value)
    base = models.get("resnet20", input_shape=(28, 28, 1), num_classes=10)
    for name in _ACCUMULATIONS.value:
        model = tfhfp8.quantize_model(base, tfhfp8.Policy("fp8", accumulation=name))
        model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
        model.train_on_batch(x, y)
        times = []
        for _ in range(_STEPS.value):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times.append(time.perf_counter() - start)
        print(f"fp8 + {name} sums: median {np.median(times):.3f} s/step "
              f"({', '.join(f'{t:.3f}' for t in times)})", flush=True)


if __name__ == "__main__":
    app.run(main)
