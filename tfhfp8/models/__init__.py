"""Reference FP32 models (Keras 3 functional API, standard Keras layers only).

The builders return plain `keras.Model` objects built from standard layers (Conv2D,
DepthwiseConv2D, Dense, BatchNormalization, ReLU, Add, pooling, Embedding,
MultiHeadAttention, LayerNormalization, Dropout, ...), so that other parts of tfhfp8 can
convert them layer by layer to emulated-precision layers. The only custom layer is
`PositionEmbedding` (elementwise, registered for `.keras` saving under the package
name `"tfhfp8"`; importing `tfhfp8.models` registers it).

All classifiers end with a `Dense(num_classes)` layer named `"classifier"` whose activation
is `classifier_activation` (default `"softmax"`; `None` for logits). Image models take
float32 `(batch, H, W, C)` input; the Transformer takes int32 token ids.

| name | default input | parameters (10 / 2 classes) |
|---|---|---|
| `resnet20` | (32, 32, 3); also (28, 28, 1) | 274,042 (272,474 trainable) |
| `mobilenet_v2` | (28, 28, 1); also (32, 32, 3) | 156,298 (149,706 trainable) |
| `small_cnn` | (28, 28, 1); also (32, 32, 3) | 207,450 (207,098 trainable) |
| `mlp` | (28, 28, 1) | 235,146 |
| `transformer_classifier` | (sequence_length,) int32 | 64*vocab + 64*length + 67,074 |

`get(name, **kwargs)` builds a model by name; `names()` lists the names.
"""

from tfhfp8 import registry
from tfhfp8.models.position_embedding import PositionEmbedding
from tfhfp8.models.mobilenet import mobilenet_v2
from tfhfp8.models.resnet import resnet20
from tfhfp8.models.simple import mlp, small_cnn
from tfhfp8.models.transformer import transformer_classifier

__all__ = [
    "PositionEmbedding",
    "get",
    "mlp",
    "mobilenet_v2",
    "names",
    "resnet20",
    "small_cnn",
    "transformer_classifier",
]

REGISTRY = registry.Registry("model", entries={
    "mlp": mlp,
    "mobilenet_v2": mobilenet_v2,
    "resnet20": resnet20,
    "small_cnn": small_cnn,
    "transformer_classifier": transformer_classifier,
})


def names():
    """Names accepted by `get`, sorted."""
    return sorted(REGISTRY.names())


def get(name, **kwargs):
    """Builds the model `name` (see `names`), passing `kwargs` to its builder.

    >>> import tfhfp8
    >>> tfhfp8.models.get("mlp", input_shape=(8, 8, 1), num_classes=10).output.shape
    (None, 10)
    """
    return REGISTRY.get(name.lower().replace("-", "_"), **kwargs)
