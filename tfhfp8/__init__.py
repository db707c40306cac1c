"""tfhfp8: exact emulation of 8- and 16-bit number formats for TensorFlow and Keras 3.

>>> import tensorflow as tf, tfhfp8
>>> tfhfp8.quantize(tf.constant([1.0, 0.1, 1000.0]), "hfp8_fwd", saturate=True).numpy()
array([ 1.       ,  0.1015625, 30.       ], dtype=float32)
"""

from tfhfp8 import (accumulation, callbacks, datasets, distribute, formats, layers,
                    loss_scaling, models, ops, optimizers)
from tfhfp8.calibration import evaluate_ptq, fold_batchnorm, ptq, recalibrate_batchnorm
from tfhfp8.conversion import quantize_model, summary
from tfhfp8.export import export
from tfhfp8.accumulation import Accumulator
from tfhfp8.fused_accumulation import FusedAccumulator
from tfhfp8.fine_tuning import finetune
from tfhfp8.formats import BlockScaled, DynamicFixedPoint, FloatFormat
from tfhfp8.gemm import matmul
from tfhfp8.policy import Policy, global_policy, set_global_policy
from tfhfp8.quantization import quantize, quantize_gradient

__version__ = "0.1.0"
