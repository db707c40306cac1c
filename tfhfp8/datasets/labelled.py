"""Labelled data for fine-tuning: a named data set, a folder of images (one subfolder
per class), a CSV file of texts, or arrays, as `load_labelled` returns them."""

import os

import numpy as np

from tfhfp8.datasets import catalog, text
from tfhfp8.datasets.common import stratified_split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def subset(x, y, limit, seed=0):
    """`(x, y)` cut to `limit` examples: the first `limit` of a fixed seeded permutation,
    in their original order (all if None). `x`: an array or a list (texts)."""
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


def load_labelled(dataset, limit=None, test_limit=None, test_fraction=0.2, seed=0):
    """`dict(kind, train=(x, y), test=(x, y), num_classes, classes)` of `dataset`: the
    labelled images or texts of `tfhfp8.finetune`.

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
        (x_train, y_train), (x_test, y_test) = text.rotten_tomatoes_texts(seed=seed)
        classes = ["rotten", "fresh"]
    elif dataset.lower().replace("-", "_") in catalog.names():
        name = dataset.lower().replace("-", "_")
        kwargs = {} if name == "fashion_mnist" else {"seed": seed}
        (x_train, y_train), (x_test, y_test) = catalog.load(name, **kwargs)[:2]
    elif os.path.isdir(dataset) or dataset.lower().endswith(".csv"):
        if not os.path.exists(dataset):
            raise ValueError(f"dataset: no such file {dataset!r}")
        x, y, classes = (_read_image_dir(dataset) if os.path.isdir(dataset)
                         else _read_text_csv(dataset))
        train, test = stratified_split(len(y), y, test_fraction, seed)
        pick = (lambda a, i: [a[j] for j in i]) if isinstance(x, list) else (lambda a, i: a[i])
        (x_train, y_train), (x_test, y_test) = (pick(x, train), y[train]), (pick(x, test),
                                                                            y[test])
    else:
        raise ValueError(f"dataset must be one of {', '.join(catalog.names())}, a folder "
                         f"of images (one subfolder per class) or a .csv file of texts; got "
                         f"{dataset!r}")
    x_train, y_train = subset(x_train, y_train, limit)
    x_test, y_test = subset(x_test, y_test, test_limit)
    texts = isinstance(x_train, list) or (isinstance(x_train, np.ndarray)
                                          and x_train.dtype.kind in "USO")
    if texts:
        x_train, x_test = [str(t) for t in x_train], [str(t) for t in x_test]
    num_classes = int(max(np.max(y_train), np.max(y_test))) + 1
    return dict(kind="text" if texts else "image", train=(x_train, y_train.astype(np.int64)),
                test=(x_test, y_test.astype(np.int64)), num_classes=num_classes,
                classes=classes)
