"""The named data sets of `tfhfp8.datasets`: `load(name, **kwargs)` and `names()`."""

from tfhfp8 import registry as _registry
from tfhfp8.datasets.images import digits, fashion_mnist, mnist_5k
from tfhfp8.datasets.text import rotten_tomatoes

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
