"""tfhfp8's formats inside tensorflow-model-optimization (tfmot) quantization-aware training.

tfmot 0.8 works with legacy tf-keras only: install the extra (`pip install
"tfhfp8[tfmot]"`, which brings `tensorflow-model-optimization` and the `tf-keras` release
of your TensorFlow) and set `TF_USE_LEGACY_KERAS=1` before TensorFlow is imported. That
switches `tf.keras` to tf-keras for the whole process, so run tfmot code in its own
process; `import tfhfp8` alone never imports tfmot nor touches `tf.keras`.

    import os; os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf, tensorflow_model_optimization as tfmot, tfhfp8.tfmot

    annotate = tfmot.quantization.keras.quantize_annotate_layer
    model = tf.keras.Sequential([
        tf.keras.Input((28, 28, 1)),
        annotate(tf.keras.layers.Conv2D(16, 3, activation="relu")),
        tf.keras.layers.MaxPooling2D(), tf.keras.layers.Flatten(),
        annotate(tf.keras.layers.Dense(64, activation="relu")),
        annotate(tf.keras.layers.Dense(10))])
    qat = tfmot.quantization.keras.quantize_apply(model, scheme=tfhfp8.tfmot.Scheme("hfp8"))

Each annotated GEMM layer (Dense, Conv1D/2D/3D) then computes what the Keras 3 layer
`tfhfp8.layers.<Layer>(policy=...)` computes, bit for bit, outputs and gradients:
`Q_a` on its inputs (a `QuantizeLayer` the scheme inserts before it), `Q_w(Q_g(W))` on
its kernel, `Q_e` (`tfhfp8.quantize_gradient`) on the gradient of the GEMM's output
(before the FP32 bias and the activation), and the policy's master-weight rounding after
each optimizer step (a kernel and bias constraint). As `tfhfp8.quantize_model`, a policy
with `exempt_first_last` keeps the first and last annotated GEMM layers in its
`exempt_format`; other layers stay FP32.

Not carried over: per-GEMM loss scaling (a policy with `loss_scaling` is a ValueError:
use tf-keras' `LossScaleOptimizer`), emulated accumulation (`accumulation=`, also a
ValueError), and the checkpointed stochastic-rounding seeds of
tfhfp8's layers (stochastic rounding here draws from TensorFlow's random state).
Save quantized models as `.h5` and load them inside `tfhfp8.tfmot.quantize_scope()`:
tfmot's models (its default scheme's too) do not reload from tf-keras' `.keras` format.

The bridge's parts: `tfhfp8.tfmot.quantize_configs` (the quantizers and the per-layer
`QuantizeConfig`) and `tfhfp8.tfmot.scheme` (the `Scheme`, its registry and the layout
transform that puts `Q_a` before each GEMM layer).
"""

import importlib.util
import os

_HOW = ('pip install "tfhfp8[tfmot]" (tensorflow-model-optimization and the tf-keras '
        'release of your TensorFlow), then set TF_USE_LEGACY_KERAS=1 before TensorFlow is '
        'imported, e.g. `TF_USE_LEGACY_KERAS=1 python train.py`, and run the tfmot code in '
        'its own process (the setting switches tf.keras for the whole process)')


def _require():
    """Checks that tf-keras and tfmot can be used here, or says what to do instead.
    Imports neither before all checks pass (tfmot would change this process's Keras)."""
    if os.environ.get("TF_USE_LEGACY_KERAS", "").lower() not in ("1", "true", "yes"):
        raise ImportError("tfhfp8.tfmot needs tensorflow-model-optimization, which works only "
                          "with legacy tf-keras: TF_USE_LEGACY_KERAS is not set. " + _HOW)
    for module in ("tf_keras", "tensorflow_model_optimization"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"tfhfp8.tfmot: {module} is not installed. " + _HOW)
    import tensorflow as tf
    if not tf.keras.__name__.startswith("tf_keras"):
        raise ImportError("tfhfp8.tfmot: tf.keras is Keras 3 in this process although "
                          "TF_USE_LEGACY_KERAS is set now: TensorFlow reads it when tf.keras "
                          "is first used. " + _HOW)


_require()

from tfhfp8.tfmot.quantize_configs import (  # only after _require()
    GEMM_LAYERS,
    ErrorsBiasActivation,
    MasterWeightRounding,
    NoOpQuantizeConfig,
    QuantizeConfig,
    Quantizer,
)
from tfhfp8.tfmot.scheme import LayoutTransform, Registry, Scheme, quantize_scope

__all__ = ["Quantizer", "QuantizeConfig", "NoOpQuantizeConfig", "MasterWeightRounding",
           "ErrorsBiasActivation", "Registry", "LayoutTransform", "Scheme", "quantize_scope",
           "GEMM_LAYERS"]
