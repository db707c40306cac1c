"""Post-training quantization: BatchNorm re-calibration, BatchNorm folding and `ptq`.

Sun et al. (HFP8, NeurIPS 2019) quantize a pretrained model's weights and activations
directly to 1-4-3 and recover its accuracy "by simply fine-tuning batch normalization
statistics": calibration batches run through the quantized model, the moving means and
variances of the BatchNormalization layers are re-estimated, no weight changes.

- `recalibrate_batchnorm(model, data)` re-estimates the statistics in place. The
  default mode, `"exact"`, gives each BatchNormalization layer exactly the statistics its
  input has at inference time over the whole calibration set: layers are processed in
  topological order, everything before a layer in inference mode, the BatchNorm layers
  before it already re-calibrated, sums accumulated in float64 across batches (a
  numerically sound parallel merge of per-batch means and centred sums of squares).
  `"one_pass"` (all BatchNorm layers in training mode at once, per-batch statistics
  averaged over batches) and `"momentum"` (the usual exponential moving average) are
  the cheaper, approximate alternatives.
- `fold_batchnorm(model)` folds each BatchNormalization into the convolution or dense
  layer right before it (FP32 arithmetic, float64 intermediate), for an inference graph.
- `ptq(model, policy, calibration_data)` = `quantize_model(model, policy.inference())`,
  re-calibration, optionally folding; `evaluate_ptq(...)` measures accuracy (or top-1
  agreement with the FP32 model) before quantization, after it and after re-calibration.

>>> import numpy as np, keras, tfhfp8
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
...                           keras.layers.BatchNormalization()])
>>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
>>> quantized = tfhfp8.ptq(model, "hfp8", calibration_data=x, verbose=0)
>>> bool(np.allclose(quantized.layers[1].moving_mean.numpy(),
...                  quantized.layers[0](x).numpy().mean(axis=0), atol=1e-5))
True
"""

import sys
import types

from tfhfp8.calibration import data
from tfhfp8.calibration.batchnorm import MODES, recalibrate_batchnorm
from tfhfp8.calibration.data import Batches
from tfhfp8.calibration.evaluation import evaluate_ptq, predict_classes, ptq
from tfhfp8.calibration.folding import FoldedBatchNormalization, fold_batchnorm
from tfhfp8.calibration.graph import batchnorm_layers

__all__ = [
    "Batches",
    "DEFAULT_MAX_STEPS",
    "FoldedBatchNormalization",
    "MODES",
    "batchnorm_layers",
    "evaluate_ptq",
    "fold_batchnorm",
    "predict_classes",
    "ptq",
    "recalibrate_batchnorm",
]


class _Package(types.ModuleType):
    """This package, whose `DEFAULT_MAX_STEPS` is `tfhfp8.calibration.data`'s, where it is
    used: `tfhfp8.calibration.DEFAULT_MAX_STEPS = n` changes the limit (a plain module
    attribute would be a copy the submodule never reads)."""

    @property
    def DEFAULT_MAX_STEPS(self):
        return data.DEFAULT_MAX_STEPS

    @DEFAULT_MAX_STEPS.setter
    def DEFAULT_MAX_STEPS(self, steps):
        data.DEFAULT_MAX_STEPS = steps


sys.modules[__name__].__class__ = _Package
