"""`tfhfp8 export`: a saved tfhfp8 model as ONNX or as a SavedModel (`tfhfp8.export`).

Reads the shared `--model`, `--output` and `--overwrite` flags of `tfhfp8.cli` and
defines its own `--format`.
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


def main():
    """Loads --model, exports it to --output and prints the sizes."""
    import tfhfp8  # noqa: PLC0415 (flags parse before TensorFlow loads)
    from tfhfp8 import experiment  # noqa: PLC0415

    model_path, output = flags.FLAGS["model"].value, flags.FLAGS["output"].value
    overwrite = flags.FLAGS["overwrite"].value
    if not model_path or not output:
        raise ValueError("export needs --model=IN.keras and --output=PATH")
    if os.path.lexists(output) and not overwrite:
        raise ValueError(f"--output: {output} exists; pass --overwrite to replace it")
    model = experiment.load_model_file(model_path, "--model")
    path = tfhfp8.export(model, output, format=_FORMAT.value, overwrite=overwrite)
    print(f"Wrote {path} ({_FORMAT.value}, {_size(path) / 1e6:.3f} MB; "
          f"{model_path}: {os.path.getsize(model_path) / 1e6:.3f} MB)")


def _size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names)
