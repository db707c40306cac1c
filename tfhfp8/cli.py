"""The `tfhfp8` command line.

Commands:
  tfhfp8 train --model=resnet20 --dataset=fashion_mnist --policies=float32,hfp8 ...
      Trains the same model from the same initial weights under each policy, prints a
      table and writes OUTPUT_DIR/results.json and OUTPUT_DIR/curves.png.
  tfhfp8 demo
      `train` with defaults that finish in a few minutes on a 2-core CPU: a small CNN
      on 10,000 Fashion-MNIST images under float32, bfloat16, fp8, hfp8 and int16_dfp,
      output in ./tfhfp8-demo/.
  tfhfp8 formats
      A table of every named number format.
  tfhfp8 ptq --model=IN.keras --policy=hfp8 --data=fashion_mnist --output=OUT.keras
      Post-training quantization with BatchNorm re-calibration; prints accuracy (or,
      without labels, agreement with the FP32 model) before quantization, after it,
      and after re-calibration.
  tfhfp8 finetune --model=MODEL --dataset=DATA --policy=hfp8 --epochs=1 --output_dir=out
      From the same pretrained weights: FP32 fine-tuning, PTQ (+ BatchNorm
      re-calibration) and fine-tuning in the policy; MODEL is a .keras/.h5 file, a
      keras.applications name or a KerasHub preset (name or directory); DATA a data set
      name, a folder of images (one subfolder per class) or a CSV of texts (text,label).
      Writes OUTPUT_DIR/results.json, finetune.png and finetuned_<policy>.keras.
%s
"""

import os
import sys
import zipfile

from absl import flags

from tfhfp8 import (block_formats, datasets, distribute, experiment, export_command, formats,
                    models, policy, program)

__doc__ %= export_command.USAGE

_COMMANDS = ("train", "demo", "formats", "ptq", "finetune", "export")

_MODEL = flags.DEFINE_string(
    "model", None, "train: a reference model (" + ", ".join(models.names()) + "); "
    "ptq: the path of a saved FP32 .keras/.h5 model; finetune: a .keras/.h5 file, a "
    "keras.applications name or a KerasHub preset (a name or a local preset directory).")
_DATASET = flags.DEFINE_string(
    "dataset", "fashion_mnist", "train: the data set to train and test on (" +
    ", ".join(datasets.names()) + "); finetune: one of those, a folder of images (one "
    "subfolder per class) or a .csv file of texts (columns text, label).")
_POLICIES = flags.DEFINE_list(
    "policies", "float32,bfloat16,fp8,hfp8,int16_dfp",
    "train: comma-separated policy presets to compare (" + ", ".join(policy.presets()) +
    "; float32 first for the differences).")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "train: training epochs per policy.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "train/ptq: batch size.")
_LOSS_SCALING = flags.DEFINE_enum(
    "loss_scaling", "adaptive", experiment.LOSS_SCALINGS,
    "train: per-layer adaptive or absmax scales (on policies that quantize errors), "
    "whole-model Keras dynamic or enhanced dynamic (with a floor) loss scaling, or none.")
_SEED = flags.DEFINE_integer("seed", 0, "train: seed of the initial weights, shuffling, split.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "tfhfp8-results",
                                  "train: folder for results.json and curves.png.")
_LIMIT = flags.DEFINE_integer("limit", None, "train: use only the first N training examples.")
_TEST_LIMIT = flags.DEFINE_integer("test_limit", None,
                                   "train: use only the first N test examples.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "train: Adam learning rate.")
_SCHEDULE = flags.DEFINE_enum(
    "learning_rate_schedule", "constant", experiment.LEARNING_RATE_SCHEDULES,
    "train: keep the learning rate constant, or decay it to 0 over the run (cosine).")
_REPLICAS = flags.DEFINE_integer(
    "replicas", 1, "train: data-parallel replicas (tf.distribute.MirroredStrategy over "
    "that many logical CPU devices); --batch_size is the global batch.")
_COMMUNICATION = flags.DEFINE_string(
    "gradient_communication", None,
    "train: all-reduce the gradients in this format, emulated exactly "
    "(tfhfp8.distribute: a ring, every partial sum rounded): " +
    ", ".join(distribute.names()) + " or any float format name; unset: Keras' FP32 "
    "all-reduce.")
_POLICY = flags.DEFINE_string("policy", "hfp8", "ptq: the policy preset to quantize to (" +
                              ", ".join(policy.presets()) + "); finetune: one or a "
                              "comma-separated list.")
_SEQUENCE_LENGTH = flags.DEFINE_integer("sequence_length", 64,
                                        "finetune: tokens per text (KerasHub models).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "finetune: resize the images and the model's input to this size "
    "(default: the model's input size).")
_IMAGE_SCALE = flags.DEFINE_float(
    "image_scale", 255.0, "finetune: images are fed as pixels in [0, IMAGE_SCALE] (255: "
    "raw pixels, as keras.applications models take).")
_DATA = flags.DEFINE_string(
    "data", None, "ptq: a data set name (" + ", ".join(datasets.names()) + "; calibrates "
    "on its training split, evaluates on its test split) or a .npz file with `x` (and "
    "optionally `y`) arrays, used for both.")
_CALIBRATION_STEPS = flags.DEFINE_integer(
    "calibration_steps", 100, "ptq: calibration batches for BatchNorm re-calibration.")
_FOLD = flags.DEFINE_boolean("fold_batchnorm", False,
                             "ptq: fold BatchNorm into the preceding layer after calibration.")
_OUTPUT = flags.DEFINE_string("output", None, "ptq: where to save the quantized model (.keras); "
                              "export: the ONNX file or SavedModel directory to write.")
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "train, demo, ptq, finetune, export: replace the files a command "
    "writes (results.json, curves.png, finetune.png, finetuned_<policy>.keras, --output) "
    "when they exist; without it the command stops before any work.")


# Every flag is checked when the flags are parsed (absl prints the message and exits
# with status 1, no traceback), before any data is loaded or any model trained.
def _at_least_one(name, allow_none=False):
    flags.register_validator(
        name, lambda value: (allow_none and value is None) or (value is not None
                                                                and value >= 1),
        message=f"--{name} must be a positive integer" + (" (or unset)" if allow_none
                                                           else ""))


for _name in ("epochs", "batch_size", "calibration_steps", "sequence_length", "replicas"):
    _at_least_one(_name)
for _name in ("limit", "test_limit", "image_size"):
    _at_least_one(_name, allow_none=True)
flags.register_validator("image_scale", lambda value: 0 < value < float("inf"),
                         message="--image_scale must be a positive finite number")
flags.register_validator("learning_rate", lambda value: 0 < value < float("inf"),
                         message="--learning_rate must be a positive finite number")
flags.register_validator(
    "policies", lambda value: bool(value) and all(p in policy.presets() for p in value),
    message="--policies must be a comma-separated list of presets: " +
    ", ".join(policy.presets()))
flags.register_validator(
    "policy", lambda value: bool(value) and all(p in policy.presets() for p in value.split(",")),
    message="--policy must be one of (or, for finetune, a comma-separated list of) " +
    ", ".join(policy.presets()))
flags.register_validator(
    "dataset", lambda value: (value.lower().replace("-", "_") in datasets.names()
                              or os.path.isdir(value) or value.lower().endswith(".csv")),
    message="--dataset must be one of " + ", ".join(datasets.names()) +
    ", a folder of images or a .csv file")


def _communication_ok(value):
    try:
        return value is None or distribute.get(value) is not None
    except (TypeError, ValueError):
        return False


flags.register_validator(
    "gradient_communication", _communication_ok,
    message="--gradient_communication must be one of " + ", ".join(distribute.names()) +
    " or a float format name (tfhfp8 formats)")
flags.register_validator(
    "model", lambda value: value is None or bool(value.strip()),
    message="--model must not be empty")
flags.register_validator("output", lambda value: value is None or bool(value.strip()),
                         message="--output must not be empty")


def _usage_error(message):
    """Exits with `message` alone (absl's UsageError prints the whole help first)."""
    sys.exit(f"{message} (tfhfp8 --help explains every flag)")


def _check_not_overwriting(paths):
    """A ValueError naming the files of `paths` that exist, unless --overwrite."""
    existing = [path for path in paths if os.path.exists(path)]
    if existing and not _OVERWRITE.value:
        raise ValueError(f"would overwrite {', '.join(existing)}; pass --overwrite to "
                         "replace, or choose another output")


def _train(**overrides):
    settings = dict(model=_MODEL.value or "resnet20", dataset=_DATASET.value,
                    policies=_POLICIES.value, epochs=_EPOCHS.value,
                    batch_size=_BATCH_SIZE.value, loss_scaling=_LOSS_SCALING.value,
                    seed=_SEED.value, output_dir=_OUTPUT_DIR.value, limit=_LIMIT.value,
                    test_limit=_TEST_LIMIT.value, learning_rate=_LEARNING_RATE.value,
                    learning_rate_schedule=_SCHEDULE.value, replicas=_REPLICAS.value,
                    gradient_communication=_COMMUNICATION.value,
                    verbose=1 if sys.stdout.isatty() else 2)  # a log gets one line per epoch
    settings.update(overrides)
    _check_not_overwriting([os.path.join(settings["output_dir"], name)
                            for name in ("results.json", "curves.png")])
    results = experiment.train_policies(**settings)
    print()
    print(experiment.table(results))
    print(f"\nWrote {settings['output_dir']}/results.json and {settings['output_dir']}/curves.png")


def _demo():
    explicit = {name for name in ("model", "dataset", "policies", "epochs", "limit",
                                  "test_limit", "output_dir", "batch_size")
                if flags.FLAGS[name].present}
    demo = dict(model="small_cnn", dataset="fashion_mnist", epochs=2, limit=10000,
                test_limit=2000, output_dir="tfhfp8-demo", batch_size=64,
                policies=["float32", "bfloat16", "fp8", "hfp8", "int16_dfp"])
    _train(**{k: v for k, v in demo.items() if k not in explicit})


def formats_table():
    """Every named format: bits, bias, range, precision and special values."""
    header = (f"{'name':<20} {'bits':>4} {'e-m':>5} {'bias':>4} {'max':>11} {'min normal':>11} "
              f"{'min subnorm':>11} {'epsilon':>9}  specials")
    lines = [header, "-" * len(header)]
    aliases = {"hfp8_fwd": "float8_e4m3b11fnuz", "hfp8_bwd": "float8_e5m2"}
    for name in formats.names():
        fmt = formats.get(name)
        if isinstance(fmt, formats.DynamicFixedPoint):
            lines.append(f"{name:<20} {fmt.bits:>4} {'':>5} {'':>4} {'':>11} {'':>11} {'':>11} "
                         f"{'':>9}  {fmt.bits}-bit integers x shared 2^E per tensor")
            continue
        if isinstance(fmt, block_formats.BlockScaled):
            # bits: average per element (the scale shared by the block included);
            # max: the element's largest value, before scaling.
            element = fmt.element
            tensor = " in an FP32 tensor scale" if fmt.tensor_scale else ""
            if element == block_formats.INT8_ELEMENT:
                e_m, bias = "int8", ""
            else:
                e_m, bias = f"{element.exponent_bits}-{element.mantissa_bits}", element.bias
            if fmt.per_tensor:
                how = (f"delayed, amax history {fmt.amax_history}" if fmt.delayed
                       else "current")
                blocks = f"one float32 scale per tensor ({how}, margin {fmt.margin})"
            elif fmt.tiles:
                rows, cols = fmt.block_shape
                blocks = f"tiles of {rows} x {cols} x {fmt.scale_name} scale{tensor}"
            else:
                blocks = f"blocks of {fmt.block_size} x {fmt.scale_name} scale{tensor}"
            lines.append(
                f"{name:<20} {fmt.bits:>4g} {e_m:<5} {bias:>4} {element.max:>11.6g} {'':>11} "
                f"{'':>11} {'':>9}  {blocks}; element {element.name}")
            continue
        specials = ", ".join(s for s, on in (("inf", fmt.has_inf), ("NaN", fmt.has_nan),
                                               ("-0", fmt.has_negative_zero),
                                               ("unsigned", not fmt.signed)) if on) or "none"
        alias = f" (= {aliases[name]})" if name in aliases else ""
        lines.append(f"{name:<20} {fmt.bits:>4} {fmt.exponent_bits}-{fmt.mantissa_bits:<3} "
                     f"{fmt.bias:>4} {fmt.max:>11.6g} {fmt.min_normal:>11.4g} "
                     f"{fmt.min_subnormal:>11.4g} {fmt.epsilon:>9.4g}  {specials}{alias}")
    return "\n".join(lines)


def _ptq():
    from tfhfp8 import calibration

    if not _MODEL.value or not _DATA.value:
        _usage_error("tfhfp8 ptq needs --model=PATH and --data=NAME_OR_NPZ")
    if "," in _POLICY.value:
        raise ValueError(f"ptq takes one --policy, got {_POLICY.value!r}")
    if not os.path.isfile(_MODEL.value):
        raise ValueError(f"--model: no such file {_MODEL.value!r}")
    if _OUTPUT.value and not _OUTPUT.value.endswith((".keras", ".h5")):
        raise ValueError("--output must be a .keras (or .h5) file name")
    if not _DATA.value.endswith(".npz") and _DATA.value not in datasets.names():
        raise ValueError(f"--data must be a .npz file or one of {', '.join(datasets.names())}; "
                         f"got {_DATA.value!r}")
    if _OUTPUT.value:  # before the work, whose result would be lost
        _check_not_overwriting([_OUTPUT.value])
        experiment.check_writable_dir(os.path.dirname(os.path.abspath(_OUTPUT.value)),
                                      "--output")
    model = experiment.load_model_file(_MODEL.value, "--model")
    if _DATA.value.endswith(".npz"):
        arrays = _load_npz(_DATA.value)
        calibration_data = arrays["x"]
        eval_data = (arrays["x"], arrays["y"]) if "y" in arrays else arrays["x"]
    else:
        (x_train, _), (x_test, y_test) = datasets.load(_DATA.value)[:2]
        calibration_data, eval_data = x_train, (x_test, y_test)
    result = calibration.evaluate_ptq(
        model, _POLICY.value, calibration_data, eval_data, steps=_CALIBRATION_STEPS.value,
        batch_size=_BATCH_SIZE.value, fold_batchnorm=_FOLD.value, verbose=1,
        return_model=True)
    quantized = result.pop("model")
    metric = result["metric"]
    print(f"\n{metric} on {result['num_examples']} examples, policy {_POLICY.value}:")
    for stage in ("fp32", "quantized", "recalibrated"):
        print(f"  {stage:<13} {100 * result[stage]:6.2f}%")
    if _OUTPUT.value:
        quantized.save(_OUTPUT.value)
        print(f"Saved the quantized model to {_OUTPUT.value}")


def _finetune():
    from tfhfp8 import fine_tuning

    if not _MODEL.value:
        _usage_error("tfhfp8 finetune needs --model (a .keras/.h5 file, a "
                     "keras.applications name or a KerasHub preset)")
    _check_not_overwriting([os.path.join(_OUTPUT_DIR.value, name) for name in (
        "results.json", "finetune.png",
        *(f"finetuned_{name}.keras" for name in _POLICY.value.split(",")))])
    results = fine_tuning.finetune(
        _MODEL.value, _DATASET.value, _POLICY.value.split(","), epochs=_EPOCHS.value,
        learning_rate=_LEARNING_RATE.value if flags.FLAGS["learning_rate"].present else None,
        batch_size=_BATCH_SIZE.value, output_dir=_OUTPUT_DIR.value,
        loss_scaling=_LOSS_SCALING.value, seed=_SEED.value, limit=_LIMIT.value,
        test_limit=_TEST_LIMIT.value, sequence_length=_SEQUENCE_LENGTH.value,
        image_size=_IMAGE_SIZE.value, image_scale=_IMAGE_SCALE.value,
        calibration_steps=_CALIBRATION_STEPS.value,
        verbose=1 if sys.stdout.isatty() else 2)
    print()
    print(fine_tuning.table(results))
    print(f"\nWrote {_OUTPUT_DIR.value}/results.json, {_OUTPUT_DIR.value}/finetune.png and "
          + ", ".join(row["finetuned"]["saved"] for row in results["policies"].values()))


def _load_npz(path):
    """The arrays `x` (and `y`, if there) of an .npz file; a ValueError naming --data."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files if name in ("x", "y")}
            names = archive.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"--data: cannot read {path!r} as an .npz archive "
                         f"({type(error).__name__}: {error})") from None
    if "x" not in arrays:
        raise ValueError(f"--data: {path!r} has no array named 'x' (it has: "
                         f"{', '.join(names) or 'none'}); save the inputs as x= and "
                         "optionally the labels as y=")
    if "y" in arrays and len(arrays["y"]) != len(arrays["x"]):
        raise ValueError(f"--data: {path!r}: x has {len(arrays['x'])} examples, y has "
                         f"{len(arrays['y'])}")
    return arrays


def main(argv):
    if len(argv) != 2 or argv[1] not in _COMMANDS:
        _usage_error(f"Usage: tfhfp8 {{{'|'.join(_COMMANDS)}}} [--flags]")
    command = argv[1]
    try:
        if command == "formats":
            print(formats_table())
        elif command == "train":
            _train()
        elif command == "demo":
            _demo()
        elif command == "finetune":
            _finetune()
        elif command == "export":
            export_command.main()
        else:
            _ptq()
    except (datasets.DatasetNotFoundError, ValueError, TypeError, OSError, ImportError) as error:
        # A user error (a bad flag value, an unreadable file): the message, no traceback.
        sys.exit(f"tfhfp8 {command}: {error}")


def run():
    """Console-script entry point."""
    # absl's --help shows the main module's docstring and flags: ours are in this one.
    sys.modules["__main__"].__doc__ = __doc__
    for flag in flags.FLAGS.flags_by_module_dict()[__name__]:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    program.run(main)


if __name__ == "__main__":
    run()
