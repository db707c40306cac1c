"""`tfhfp8 export`: a saved tfhfp8 model as ONNX or as a SavedModel (`tfhfp8.export`).

Reads the shared `--model` and `--output` flags of `tfhfp8.cli` and defines its own.
"""

import os

from absl import flags

USAGE = """  tfhfp8 export --model=IN.keras --format=onnx --output=OUT.onnx [--overwrite]
      A model saved by `ptq --output`, `finetune` or Keras (tfhfp8 layers, any policy
      whose weights and activations round to nearest) as ONNX (QuantizeLinear /
      DequantizeLinear in each format's ONNX type, weights stored quantized) or, with
      --format=saved_model, as a TensorFlow SavedModel that serves without tfhfp8.
      Refuses to replace an existing OUTPUT unless --overwrite."""

_FORMAT = flags.DEFINE_enum("format", "onnx", ["onnx", "saved_model"],
                            "export: ONNX file or TensorFlow SavedModel directory.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False,
                                  "export: replace an existing --output.")


def main():
    """Loads --model, exports it to --output and prints the sizes."""
    import keras  # noqa: PLC0415 (flags parse before TensorFlow loads)

    import tfhfp8  # noqa: PLC0415

    model_path, output = flags.FLAGS["model"].value, flags.FLAGS["output"].value
    if not model_path or not output:
        raise ValueError("export needs --model=IN.keras and --output=PATH")
    if not os.path.isfile(model_path):
        raise ValueError(f"--model: no such file {model_path!r}")
    if os.path.lexists(output) and not _OVERWRITE.value:
        raise ValueError(f"--output: {output} exists; pass --overwrite to replace it")
    try:
        model = keras.saving.load_model(model_path, compile=False)
    except Exception as error:  # Keras raises many kinds for a file that is not a model
        raise ValueError(f"--model: cannot load {model_path!r} as a Keras model: "
                         f"{type(error).__name__}: {error}") from None
    path = tfhfp8.export(model, output, format=_FORMAT.value, overwrite=_OVERWRITE.value)
    print(f"Wrote {path} ({_FORMAT.value}, {_size(path) / 1e6:.3f} MB; "
          f"{model_path}: {os.path.getsize(model_path) / 1e6:.3f} MB)")


def _size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names)
