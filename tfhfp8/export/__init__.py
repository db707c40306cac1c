"""Deploying an emulated model: ONNX with QuantizeLinear / DequantizeLinear, or a
SavedModel that serves without tfhfp8 (see docs/deployment.md).

    model = tfhfp8.quantize_model(keras_model, "hfp8")
    tfhfp8.export(model, "model.onnx")                    # ONNX Runtime, TensorRT, ...
    tfhfp8.export(model, "served", format="saved_model")  # TF Serving, without tfhfp8
"""

import os
import shutil
import tempfile

import keras

FORMATS = ("onnx", "saved_model")


def export(model, path, format="onnx", overwrite=False):  # noqa: A002 (the issue's name)
    """Writes `model` for inference outside tfhfp8; returns `path`.

    Args:
      model: a built Keras Functional or Sequential model, typically from
        `tfhfp8.quantize_model` or built from `tfhfp8.layers` (a plain Keras model
        exports as FP32).
      path: the file (ONNX) or directory (SavedModel) to write. Written under a
        temporary name and moved into place: a failed export leaves nothing behind.
      format: `"onnx"`: every quantization of the weights and activations becomes
        QuantizeLinear -> DequantizeLinear in the format's ONNX type (weights stored
        quantized, with their scales), at the lowest opset that has the types (19 for
        float8, 21 for INT16 and MX blocks); needs the `export` extra (onnx, tf2onnx).
        `"saved_model"`: a TensorFlow SavedModel whose graph uses only standard
        TensorFlow ops (the quantizer's TF-ops backend), loadable without tfhfp8.
      overwrite: replace an existing `path` (otherwise FileExistsError).

    Raises:
      ValueError: a format ONNX cannot hold, or an operation the exporter cannot
        express (the message names the layer or node); a model never built.
      FileExistsError: `path` exists and `overwrite` is False.

    Only inference exists in the exported model: the training-only parts of a policy
    (errors, weight gradients, master weights, loss scaling, stochastic rounding of
    those) are left out; weights and activations must round to nearest.
    """
    _check_model(model)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = os.path.abspath(os.fspath(path))
    _check_path(path, overwrite)
    workdir = tempfile.mkdtemp(prefix=".tfhfp8-export-", dir=os.path.dirname(path))
    try:
        staged = os.path.join(workdir, os.path.basename(path))
        if format == "onnx":
            _write_onnx(model, staged)
        else:
            from tfhfp8.export import saved_model  # noqa: PLC0415

            saved_model.to_saved_model(model, staged)
        if os.path.lexists(path):  # overwrite=True, checked above
            _remove(path)
        os.replace(staged, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return path


def _write_onnx(model, staged):
    try:
        import onnx  # noqa: PLC0415
        import tf2onnx  # noqa: F401, PLC0415
    except ImportError as error:
        raise ImportError(f"format='onnx' needs onnx and tf2onnx: pip install "
                          f"'tfhfp8[export]' ({error})") from None
    from tfhfp8.export import onnx_export  # noqa: PLC0415

    proto, _ = onnx_export.to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, staged)


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise ValueError(f"model {model.name!r} was never built: call it on data or give "
                         "it an Input first")
    if not getattr(model, "inputs", None):  # a subclassed model has no symbolic input
        raise ValueError(f"model {model.name!r} ({type(model).__name__}) has no symbolic "
                         "inputs: export a Functional or Sequential model") from None


def _check_path(path, overwrite):
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (tfhfp8 export "
                              "--overwrite) to replace it")
    if not os.path.isdir(os.path.dirname(path)):
        raise FileNotFoundError(f"the folder of {path} does not exist")


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
