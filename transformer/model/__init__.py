"""The model: the Annotated Transformer's modules under the article's names.

* ``architecture`` — ``EncoderDecoder``, ``Encoder``, ``Decoder``, their layers,
  ``SublayerConnection``, ``PositionwiseFeedForward``, ``Embeddings``,
  ``PositionalEncoding``, ``Generator`` and ``make_model``;
* ``attention`` — ``attention()`` and ``MultiHeadedAttention``;
* ``cache`` — the keys and values kept between decoding steps, outside the modules.
"""

from transformer.model.architecture import (
    Decoder,
    DecoderLayer,
    Embeddings,
    Encoder,
    EncoderDecoder,
    EncoderLayer,
    Generator,
    PositionalEncoding,
    PositionwiseFeedForward,
    SublayerConnection,
    TokenEmbedding,
    clones,
    make_model,
    sinusoid_table,
)
from transformer.model.attention import MultiHeadedAttention, attention
from transformer.model.cache import DecoderCache, KVCache, LayerCache

__all__ = [
    "Decoder", "DecoderCache", "DecoderLayer", "Embeddings", "Encoder", "EncoderDecoder", "EncoderLayer",
    "Generator", "KVCache", "LayerCache", "MultiHeadedAttention", "PositionalEncoding", "PositionwiseFeedForward",
    "SublayerConnection", "TokenEmbedding", "attention", "clones", "make_model", "sinusoid_table",
]
