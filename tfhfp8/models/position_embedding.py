"""Small custom layers used by the reference models (registered for `.keras` saving)."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfhfp8")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned position embedding to a sequence of vectors.

    Holds one trainable weight `embeddings` of shape `(sequence_length, embed_dim)`;
    for an input `x` of shape `(batch, length, embed_dim)` with
    `length <= sequence_length` it returns `x + embeddings[:length]`. This is the same
    as an `Embedding(sequence_length, embed_dim)` looked up at positions
    `0 .. length - 1` and added to `x`, without a second model input.
    The addition is elementwise (no matrix product), so precision emulation leaves it in FP32.

    Args:
        sequence_length: maximum sequence length (number of positions).
        initializer: initializer of the position table (default `uniform` in
            `[-0.05, 0.05]`, as `keras.layers.Embedding`).
    """

    def __init__(self, sequence_length, initializer="uniform", **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = int(sequence_length)
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        embed_dim = input_shape[-1]
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.sequence_length, embed_dim),
            initializer=self.initializer,
            trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs):
        length = ops.shape(inputs)[-2]
        positions = ops.slice(self.embeddings, (0, 0), (length, ops.shape(self.embeddings)[-1]))
        return inputs + ops.cast(positions, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sequence_length": self.sequence_length,
                "initializer": keras.initializers.serialize(self.initializer),
            }
        )
        return config
