"""KerasHub encoders rebuilt from plain Keras layers, so that every GEMM can be emulated.

KerasHub's `TransformerEncoder` computes its attention and feed-forward GEMMs inside
one custom layer, which `tfhfp8.quantize_model` cannot see into;
`unroll_transformer_encoder` rebuilds the same computation from Keras layers.
"""

import keras

from tfhfp8 import _compat
from tfhfp8.models.position_embedding import PositionEmbedding


def copy_layer(layer, cls=None, **overrides):
    """A new, unbuilt layer from `layer`'s config (of class `cls`, default its own) with
    `overrides` applied."""
    config = layer.get_config()
    config.update(overrides)
    return (cls or type(layer)).from_config(config)


def unroll_transformer_encoder(backbone):
    """A KerasHub BERT-like encoder backbone as a Functional model of plain Keras layers.

    KerasHub's `TransformerEncoder` computes its attention and feed-forward GEMMs inside
    one custom layer, which `quantize_model` cannot see into. This rebuilds the same
    computation (post-norm BERT blocks: attention, residual, LayerNorm, two Dense,
    residual, LayerNorm) from `Embedding`, `MultiHeadAttention`, `Dense` and
    `LayerNormalization` layers and copies the weights. Inputs: `token_ids`,
    `segment_ids`, `padding_mask`; output: the sequence of hidden states. The
    feed-forward activation is the exact GELU of the original BERT models (KerasHub
    uses its tanh approximation; the difference is below 1e-3).
    """
    names = {layer.name for layer in backbone.layers}
    needed = {"token_embedding", "position_embedding", "embeddings_layer_norm"}
    if not needed <= names:
        raise ValueError(f"model: {type(backbone).__name__} is not a BERT-like KerasHub "
                         f"encoder (layers {sorted(needed - names)} missing); tfhfp8 "
                         "rebuilds TransformerEncoder backbones only")
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    token = backbone.get_layer("token_embedding")
    token_embedding = keras.layers.Embedding(token.input_dim, token.output_dim,
                                             name="token_embedding")
    x = token_embedding(token_ids)
    position = backbone.get_layer("position_embedding")
    position_embedding = PositionEmbedding(position.sequence_length, name="position_embedding")
    x = position_embedding(x)
    copies = [(token_embedding, token), (position_embedding, position)]
    if "segment_embedding" in names:
        segment = backbone.get_layer("segment_embedding")
        segment_embedding = copy_layer(segment, keras.layers.Embedding)
        x = keras.layers.Add(name="embeddings_add")([x, segment_embedding(segment_ids)])
        copies.append((segment_embedding, segment))
    norm = backbone.get_layer("embeddings_layer_norm")
    new_norm = copy_layer(norm)
    x = new_norm(x)
    copies.append((new_norm, norm))
    dropout = backbone.config.get("dropout", 0.0) if hasattr(backbone, "config") else 0.0
    dropout = backbone.get_config().get("dropout", dropout)
    x = keras.layers.Dropout(dropout, name="embeddings_dropout")(x)
    blocks = [layer for layer in backbone.layers if type(layer).__name__ == "TransformerEncoder"]
    for block in blocks:
        if getattr(block, "normalize_first", False):
            raise ValueError(f"model: layer {block.name!r} (TransformerEncoder) normalizes "
                             "first; tfhfp8 rebuilds post-norm (BERT) encoders only")
        parts = _compat.transformer_encoder_parts(block)
        attention = parts["attention"]
        if type(attention) is not keras.layers.MultiHeadAttention:
            raise ValueError(f"model: layer {block.name!r}: its attention is "
                             f"{type(attention).__name__}, not keras.layers.MultiHeadAttention")
        new_attention = copy_layer(attention, name=f"{block.name}_attention")
        residual = x
        y = new_attention(x, x, value_mask=padding_mask)
        y = keras.layers.Dropout(block.dropout, name=f"{block.name}_attention_dropout")(y)
        y = keras.layers.Add(name=f"{block.name}_attention_add")([y, residual])
        attention_norm = copy_layer(parts["attention_norm"],
                                     name=f"{block.name}_attention_norm")
        y = attention_norm(y)
        residual = y
        intermediate = copy_layer(parts["intermediate"],
                                   name=f"{block.name}_intermediate", activation="gelu")
        output = copy_layer(parts["output"], name=f"{block.name}_output")
        y = output(intermediate(y))
        y = keras.layers.Dropout(block.dropout, name=f"{block.name}_output_dropout")(y)
        y = keras.layers.Add(name=f"{block.name}_output_add")([y, residual])
        output_norm = copy_layer(parts["output_norm"],
                                  name=f"{block.name}_output_norm")
        x = output_norm(y)
        copies += [(new_attention, attention),
                   (attention_norm, parts["attention_norm"]),
                   (intermediate, parts["intermediate"]),
                   (output, parts["output"]),
                   (output_norm, parts["output_norm"])]
    model = keras.Model({"token_ids": token_ids, "segment_ids": segment_ids,
                         "padding_mask": padding_mask}, x, name=f"{backbone.name}_unrolled")
    for new, old in copies:
        new.set_weights(old.get_weights())
    return model
