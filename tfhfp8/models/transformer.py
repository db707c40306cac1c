"""A small Transformer encoder classifier (Vaswani et al. 2017, encoder only)."""

import keras
from keras import layers

from tfhfp8.models.position_embedding import PositionEmbedding


def _encoder_block(x, embed_dim, num_heads, ff_dim, dropout, name):
    """Post-LN encoder block: `LN(x + MHA(x))` then `LN(y + FFN(y))`."""
    attention = layers.MultiHeadAttention(
        num_heads=num_heads, key_dim=embed_dim // num_heads, name=f"{name}_attention"
    )(x, x)
    attention = layers.Dropout(dropout, name=f"{name}_attention_dropout")(attention)
    x = layers.Add(name=f"{name}_attention_add")([x, attention])
    x = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_attention_norm")(x)
    ff = layers.Dense(ff_dim, activation="relu", name=f"{name}_ff1")(x)
    ff = layers.Dense(embed_dim, name=f"{name}_ff2")(ff)
    ff = layers.Dropout(dropout, name=f"{name}_ff_dropout")(ff)
    x = layers.Add(name=f"{name}_ff_add")([x, ff])
    return layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ff_norm")(x)


def transformer_classifier(
    vocab_size,
    sequence_length,
    num_classes=2,
    embed_dim=64,
    num_heads=4,
    ff_dim=128,
    num_layers=2,
    dropout=0.1,
    classifier_activation="softmax",
):
    """Transformer encoder text classifier on token ids.

    Architecture: `Embedding(vocab_size, embed_dim)` on the token ids, plus a learned
    position embedding (`tfhfp8.models.PositionEmbedding`, a registered
    serializable layer adding a `(sequence_length, embed_dim)` table); `num_layers`
    post-LN encoder blocks, each `x = LN(x + Dropout(MHA(x, x)))` and
    `x = LN(x + Dropout(Dense(embed_dim)(Dense(ff_dim, relu)(x))))` with
    `key_dim = embed_dim // num_heads`; `GlobalAveragePooling1D` over positions,
    dropout and a Dense classifier. Token id 0 is padding; it is not masked (the model
    learns to ignore it), which keeps every layer a plain, mask-free Keras layer.

    Args:
        vocab_size: number of token ids (ids must lie in `[0, vocab_size)`).
        sequence_length: length of the input sequences.
        num_classes: number of output units.
        embed_dim: model width (must be divisible by `num_heads`).
        num_heads: attention heads.
        ff_dim: hidden width of the feed-forward network.
        num_layers: number of encoder blocks.
        dropout: dropout rate (attention output, feed-forward output, before classifier).
        classifier_activation: activation of the last Dense layer (`None` for logits).

    Returns:
        A functional `keras.Model` named `"transformer_classifier"`; input
        `(batch, sequence_length)` int32 token ids, output `(batch, num_classes)`.

    Parameter count (all trainable), with `d = embed_dim`, `f = ff_dim`:

        vocab_size*d + sequence_length*d
        + num_layers * (4*d*d + 4*d          # attention Q, K, V, output (+ biases)
                        + 2*d*f + f + d      # feed-forward
                        + 4*d)               # two LayerNormalizations
        + d*num_classes + num_classes

    For the defaults (d=64, 4 heads, f=128, 2 layers, 2 classes) that is
    `64*vocab_size + 64*sequence_length + 67,074`; e.g. **712,194** for
    `vocab_size=10000, sequence_length=80`.
    """
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
    inputs = layers.Input(shape=(sequence_length,), dtype="int32", name="token_ids")
    x = layers.Embedding(vocab_size, embed_dim, name="token_embedding")(inputs)
    x = PositionEmbedding(sequence_length, name="position_embedding")(x)
    for index in range(num_layers):
        x = _encoder_block(x, embed_dim, num_heads, ff_dim, dropout, f"encoder{index}")
    x = layers.GlobalAveragePooling1D(name="avg_pool")(x)
    x = layers.Dropout(dropout, name="classifier_dropout")(x)
    outputs = layers.Dense(num_classes, activation=classifier_activation, name="classifier")(x)
    return keras.Model(inputs, outputs, name="transformer_classifier")
