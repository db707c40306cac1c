"""Pretrained models for fine-tuning: loading them, giving them a new classification
head, and checking that `tfhfp8.quantize_model` reaches every GEMM."""

import os
import time

import keras
import numpy as np

from tfhfp8 import _compat, experiment
from tfhfp8.conversion import NON_GEMM_LAYERS
from tfhfp8.layers import EMULATED, walk


def log(verbose, message):
    """Prints a timestamped progress line of fine-tuning when `verbose`."""
    if verbose:
        print(f"[{time.strftime('%H:%M:%S')}] finetune: {message}", flush=True)


def _is_preset(spec):
    if os.path.isdir(spec):
        return any(os.path.exists(os.path.join(spec, f)) for f in ("config.json",
                                                                    "metadata.json"))
    return "/" not in spec and not spec.endswith((".keras", ".h5")) and not hasattr(
        keras.applications, spec)


def _keras_hub():
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError("KerasHub presets need keras-hub: pip install keras-hub "
                          "(or pip install tfhfp8[finetune])") from error
    return keras_hub


def text_classifier(encoder, num_classes, dropout=0.1):
    """Mean of the hidden states over the real tokens (sentence-transformers' pooling),
    dropout, a new `Dense(num_classes)` (logits)."""
    inputs = {name: keras.Input((None,), dtype="int32", name=name)
              for name in ("token_ids", "segment_ids", "padding_mask")}
    hidden = encoder(inputs)
    pooled = keras.layers.GlobalAveragePooling1D(name="mean_pool")(
        hidden, mask=inputs["padding_mask"])
    pooled = keras.layers.Dropout(dropout, name="head_dropout")(pooled)
    outputs = keras.layers.Dense(num_classes, name="classifier")(pooled)
    return keras.Model(inputs, outputs, name="text_classifier")


def image_classifier(model, num_classes, image_size=None):
    """`model` (a pretrained image model) with a new `Dense(num_classes)` head on the
    features before its last Dense layer (or on its pooled output), at `image_size`."""
    if image_size is not None:
        shape = tuple(model.input_shape[1:])
        if shape[:2] != (image_size, image_size):
            clone = keras.models.clone_model(
                model, input_tensors=keras.Input((image_size, image_size, shape[-1]),
                                                 name=model.input_names[0]
                                                 if hasattr(model, "input_names") else None))
            clone.set_weights(model.get_weights())
            model = clone
    layers = model.layers
    cut = None
    for index in range(len(layers) - 1, 0, -1):
        layer = layers[index]
        if isinstance(layer, keras.layers.Dense):
            cut = layer.input
            break
        if not isinstance(layer, (keras.layers.Activation, keras.layers.Softmax,
                                  keras.layers.Dropout, keras.layers.Reshape,
                                  keras.layers.Flatten)):
            break
    features = cut if cut is not None else model.output
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="head_pool")(features)
    elif len(features.shape) != 2:
        features = keras.layers.Flatten(name="head_flatten")(features)
    outputs = keras.layers.Dense(num_classes, name="classifier")(features)
    return keras.Model(model.input, outputs, name=f"{model.name}_classifier")


def load_pretrained(spec, verbose=0):
    """`(model, kind, preprocessor)`: a pretrained Keras model from a path, a
    `keras.applications` name or a KerasHub preset; `kind` is "text" or "image"."""
    if isinstance(spec, keras.Model):
        return spec, "image", None
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"model must be a keras.Model, a .keras/.h5 path, a "
                        f"keras.applications name or a KerasHub preset; got {spec!r}")
    if spec.endswith((".keras", ".h5")) or (os.path.isfile(spec)):
        return experiment.load_model_file(spec, "model"), "image", None
    if hasattr(keras.applications, spec) and not os.path.isdir(spec):
        builder = getattr(keras.applications, spec)
        try:
            return builder(weights="imagenet"), "image", None
        except Exception as error:  # the download of the weights, offline
            raise ValueError(f"model: keras.applications.{spec}(weights='imagenet') failed "
                             f"({type(error).__name__}: {error})") from None
    if os.path.sep in spec and not os.path.isdir(spec):
        raise ValueError(f"model: no such file or preset directory {spec!r}")
    keras_hub = _keras_hub()
    log(verbose, f"loading the KerasHub preset {spec}")
    try:
        backbone = keras_hub.models.Backbone.from_preset(spec)
        preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(spec)
    except Exception as error:
        raise ValueError(f"model: cannot load the KerasHub preset {spec!r} "
                         f"({type(error).__name__}: {error})") from None
    return backbone, "text", preprocessor


def check_convertible(model):
    """Raises a ValueError naming the first layer whose GEMMs `quantize_model` cannot
    emulate: a layer of an unknown type that holds Dense/convolution/attention layers or
    a `kernel`, or a subclass of a supported layer (which would stay FP32)."""
    if not _compat.is_graph_model(model):
        raise ValueError(f"model: {type(model).__name__} is a subclassed model whose layers "
                         "tfhfp8 cannot convert; build it as a Functional or Sequential model")
    supported = tuple(EMULATED)
    for layer in walk(model):
        if type(layer) in EMULATED or type(layer) in EMULATED.values():
            continue
        if isinstance(layer, supported):
            raise ValueError(
                f"model: layer {layer.name!r} is a {type(layer).__name__}, a subclass of "
                f"{next(c.__name__ for c in supported if isinstance(layer, c))} that tfhfp8 "
                "cannot emulate (its GEMM would stay FP32); rebuild it from the Keras layer")
        if isinstance(layer, NON_GEMM_LAYERS):
            continue
        inner = [sub for sub in _compat.sublayers(layer) if isinstance(sub, supported)]
        kernels = [v.path for v in layer.weights if "kernel" in v.path.split("/")[-1]]
        if inner or kernels:
            what = (f"holds {type(inner[0]).__name__} layer {inner[0].name!r}" if inner
                    else f"has a kernel {kernels[0]!r}")
            raise ValueError(
                f"model: layer {layer.name!r} ({type(layer).__name__}) {what} that tfhfp8 "
                "cannot convert: only GEMMs in the layers of tfhfp8.layers.EMULATED run "
                "in emulated formats; rebuild the model from those layers")


def prepare_images(x, model_input_shape, image_scale, batch=512):
    """Images in [0, 1] (n, h, w, c) -> the model's size and channels, times `image_scale`."""
    import tensorflow as tf

    height, width, channels = model_input_shape[-3:]
    x = np.asarray(x, np.float32)
    out = []
    for start in range(0, len(x), batch):
        part = tf.constant(x[start:start + batch])
        if channels == 3 and part.shape[-1] == 1:
            part = tf.image.grayscale_to_rgb(part)
        elif channels == 1 and part.shape[-1] == 3:
            part = tf.image.rgb_to_grayscale(part)
        if height is not None and (height, width) != tuple(part.shape[1:3]):
            part = tf.image.resize(part, (height, width))
        out.append(part.numpy() * np.float32(image_scale))
    return np.concatenate(out)
