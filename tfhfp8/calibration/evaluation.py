"""Post-training quantization (`ptq`) and its measurement (`evaluate_ptq`)."""

import time

import keras
import numpy as np
import tensorflow as tf

from tfhfp8 import policy as policy_lib
from tfhfp8.calibration import folding
from tfhfp8.calibration.batchnorm import recalibrate_batchnorm
from tfhfp8.calibration.data import Batches, check_batch, input_specs, to_tensors
from tfhfp8.calibration.graph import has_batchnorm
from tfhfp8.conversion import copy_weights, quantize_model


_FOLD_ORDERS = (False, True, "after", "before")


def _inference_policy(policy):
    policy = policy_lib.get(policy)
    if any(policy.formats[role] is not None
           for role in ("errors", "weight_gradients", "master_weights")):
        policy = policy.inference()
    return policy


def _calibrate_and_fold(model, quantized, policy, batches, fold, mode, momentum, exempt,
                        verbose):
    """Re-calibrates `quantized` (a quantized copy of `model`), folding as asked."""
    calibrate = batches is not None and has_batchnorm(quantized)
    if fold == "before":
        folded = quantize_model(folding.fold_batchnorm(model, verbose=verbose), policy,
                                exempt=exempt)
        if batches is not None and has_batchnorm(folded):
            recalibrate_batchnorm(folded, batches, mode=mode, momentum=momentum,
                                  verbose=verbose)
        return folded
    if calibrate:
        recalibrate_batchnorm(quantized, batches, mode=mode, momentum=momentum,
                              verbose=verbose)
    elif verbose and batches is not None:
        print("ptq: the model has no BatchNormalization layer: nothing to re-calibrate")
    if not fold:
        return quantized
    # "after": fold the re-calibrated statistics into the FP32 weights, then quantize the
    # folded weights; BatchNorm layers that could not be folded see slightly different
    # inputs now (Q(W*s) instead of Q(W)*s) and are re-calibrated once more.
    fp32 = keras.models.clone_model(model, recursive=True)
    copy_weights(quantized, fp32)
    folded = quantize_model(folding.fold_batchnorm(fp32, verbose=verbose), policy, exempt=exempt)
    if calibrate and has_batchnorm(folded):
        recalibrate_batchnorm(folded, batches, mode=mode, momentum=momentum, verbose=verbose)
    return folded


def ptq(model, policy="hfp8", calibration_data=None, steps=None, *, fold_batchnorm=False,
        mode="exact", momentum=None, batch_size=32, exempt=None, verbose=1):
    """Post-training quantization: quantize, re-calibrate BatchNorm, optionally fold.

    1. `tfhfp8.quantize_model(model, policy.inference())`: weights and activations of
       every GEMM layer in the policy's formats (no backward formats are needed); the
       policy's exemptions apply (the `hfp8` and `fp8` presets keep the first and last
       GEMM layers in 16 bits: pass `tfhfp8.Policy("hfp8", exempt_first_last=False)` for
       every layer in 8 bits).
    2. `recalibrate_batchnorm` on the quantized model with `calibration_data` (skipped
       when it is None or the model has no BatchNormalization layer).
    3. With `fold_batchnorm`, an inference graph without foldable BatchNorm layers:
       - `True` or `"after"` (the default order): the re-calibrated statistics are folded
         into the FP32 weights (`fold_batchnorm`), the folded model is quantized again
         (so the folded weights are rounded once, `Q(W*s)`), and the BatchNorm layers
         that could not be folded are re-calibrated once more. Folding keeps the
         benefit of re-calibration, which is the point of PTQ here (the published
         implementation of the HFP8 recipe also folded after re-estimating).
       - `"before"`: fold in FP32 on the original model, then quantize, then
         re-calibrate the remaining BatchNorm layers; the folded ones keep their
         training-time statistics (re-calibration is not applicable to them).

    Args:
      model: a built FP32 Functional or Sequential model (not modified).
      policy: a `tfhfp8.Policy` or preset name (only its forward roles are used).
      calibration_data, steps, mode, momentum, batch_size: as in `recalibrate_batchnorm`.
      exempt: layer names kept in FP32 (`quantize_model`).
      verbose: progress bars and messages.

    Returns:
      The quantized (and re-calibrated, and folded) model.
    """
    if fold_batchnorm not in _FOLD_ORDERS:
        raise ValueError(f"fold_batchnorm must be one of {_FOLD_ORDERS}, got {fold_batchnorm!r}")
    policy = _inference_policy(policy)
    batches = None if calibration_data is None else (
        calibration_data if isinstance(calibration_data, Batches)
        else Batches(calibration_data, steps, batch_size))
    quantized = quantize_model(model, policy, exempt=exempt)
    return _calibrate_and_fold(model, quantized, policy, batches,
                               "after" if fold_batchnorm is True else fold_batchnorm,
                               mode, momentum, exempt, verbose)


def _first_output(outputs):
    return tf.nest.flatten(outputs)[0]


def _classes(outputs):
    outputs = np.asarray(outputs)
    if outputs.ndim >= 2 and outputs.shape[-1] > 1:
        return outputs.argmax(axis=-1)
    outputs = outputs.reshape(outputs.shape[0], -1)[:, 0] if outputs.ndim > 1 else outputs
    threshold = 0.5 if (outputs.min() >= 0 and outputs.max() <= 1) else 0.0
    return (outputs > threshold).astype(np.int64)


def _labels(y, num_classes):
    y = np.asarray(y)
    if y.ndim >= 2 and y.shape[-1] == num_classes and num_classes > 1:
        return y.argmax(axis=-1)  # one-hot
    return y.reshape(y.shape[0], -1)[:, 0] if y.ndim > 1 else y


def predict_classes(model, batches):
    """(top-1 classes, labels or None) of `model` in inference mode over `batches`."""
    specs = input_specs(model)
    step = tf.function(lambda x: _first_output(model(x, training=False)),
                       reduce_retracing=True)
    predictions, labels = [], []
    for index, (x, y) in enumerate(batches):
        check_batch(specs, x, index, batches.what)
        out = step(to_tensors(x)).numpy()
        predictions.append(_classes(out))
        if y is not None:
            labels.append(_labels(tf.nest.flatten(y)[0], out.shape[-1] if out.ndim > 1 else 1))
        elif labels:
            raise ValueError(f"{batches.what}: batch {index} has no labels, earlier ones do")
    if not predictions:
        raise ValueError(f"{batches.what} is empty: it gave no batch")
    predictions = np.concatenate(predictions)
    if labels:
        labels = np.concatenate(labels)
        if labels.shape != predictions.shape:
            raise ValueError(f"{batches.what}: labels of shape {labels.shape} do not match "
                             f"the {predictions.shape[0]} predictions")
        return predictions, labels
    return predictions, None


def evaluate_ptq(model, policy="hfp8", calibration_data=None, eval_data=None, *, steps=None,
                 eval_steps=None, batch_size=32, fold_batchnorm=False, mode="exact",
                 momentum=None, exempt=None, verbose=0, return_model=False):
    """Accuracy (or agreement with FP32) before quantization, after it, after re-calibration.

    Args:
      model: the FP32 model (not modified).
      policy, calibration_data, steps, fold_batchnorm, mode, momentum, exempt: as in
        `ptq`.
      eval_data: evaluation inputs with labels (`(x, y)`, or a data set / batches of
        `(x, y)`; integer or one-hot labels) or without (`x` alone).
      eval_steps: at most this many evaluation batches.
      return_model: also return the re-calibrated quantized model, as `result["model"]`.

    Returns:
      A dict: `metric` (`"accuracy"` with labels, else `"agreement"`: the fraction of
      examples whose top-1 class equals the FP32 model's), `fp32`, `quantized`,
      `recalibrated` (the metric for the FP32 model, the quantized model without
      re-calibration and the re-calibrated (and folded) model; with `"agreement"`,
      `fp32` is 1.0), `agreement_quantized`, `agreement_recalibrated` (always),
      `num_examples`, `calibration_batches`, `calibration_seconds`, `policy`, `mode`,
      `fold_batchnorm`.
    """
    if fold_batchnorm not in _FOLD_ORDERS:
        raise ValueError(f"fold_batchnorm must be one of {_FOLD_ORDERS}, got {fold_batchnorm!r}")
    policy = _inference_policy(policy)
    evaluation = Batches(eval_data, eval_steps, batch_size, what="evaluation data")
    batches = None if calibration_data is None else Batches(calibration_data, steps,
                                                             batch_size)
    reference, labels = predict_classes(model, evaluation)
    quantized = quantize_model(model, policy, exempt=exempt)
    before, _ = predict_classes(quantized, evaluation)
    start = time.perf_counter()
    calibrated = _calibrate_and_fold(model, quantized, policy, batches,
                                     "after" if fold_batchnorm is True else fold_batchnorm,
                                     mode, momentum, exempt, verbose)
    seconds = time.perf_counter() - start
    after, _ = predict_classes(calibrated, evaluation)

    def agree(a, b):
        return float(np.mean(a == b))

    result = dict(
        metric="accuracy" if labels is not None else "agreement",
        policy=policy.name, mode=mode, fold_batchnorm=fold_batchnorm,
        num_examples=int(reference.shape[0]),
        calibration_batches=None if batches is None else batches.num_batches,
        calibration_seconds=seconds,
        agreement_quantized=agree(before, reference),
        agreement_recalibrated=agree(after, reference),
    )
    if labels is not None:
        result.update(fp32=agree(reference, labels), quantized=agree(before, labels),
                      recalibrated=agree(after, labels))
    else:
        result.update(fp32=1.0, quantized=result["agreement_quantized"],
                      recalibrated=result["agreement_recalibrated"])
    if return_model:
        result["model"] = calibrated
    return result
