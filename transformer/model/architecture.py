"""The Annotated Transformer's encoder-decoder, under the article's names.

Differences from the reference code, each on purpose:

* ``nn.LayerNorm`` (biased variance, eps inside the square root) instead of the
  reference's hand-written norm (unbiased std, eps outside).
* Residual blocks are pre-norm with a final norm, as the reference; the paper's
  post-norm is one argument away (``norm="post"``).
* Attention dropout follows ``dropout`` (the reference always used 0.1).
* Source, target and generator embeddings can be tied (``tie_embeddings=True``).
* ``decode`` takes an optional cache for incremental decoding; the modules keep no
  state between calls (see ``transformer.model.cache``).
* Dropout draws its mask more cheaply on the CPU (``transformer.fast.dropout``).
* ``EncoderDecoder`` names its own sizes (``d_model``, ``max_positions``,
  ``src_vocab``, ``tgt_vocab``) and gives the output layer's scores (``logits``), so
  that no caller reaches into its modules by index.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.fast.dropout import Dropout
from transformer.model.attention import MultiHeadedAttention
from transformer.model.cache import DecoderCache, LayerCache


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    """Produce n identical, independent copies of a module."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class SublayerConnection(nn.Module):
    """A residual connection around a sublayer, with layer norm and dropout.

    Pre-norm (the reference): ``x + dropout(sublayer(norm(x)))``; the residual path
    stays an identity, which makes deep stacks train without a long warmup.
    Post-norm (the paper): ``norm(x + dropout(sublayer(x)))``.
    """

    def __init__(self, size: int, dropout: float, pre_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(size)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = W₂ · dropout(ReLU(W₁ x + b₁)) + b₂, applied at every position."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each inside a ``SublayerConnection``."""

    def __init__(
        self,
        size: int,
        self_attn: MultiHeadedAttention,
        feed_forward: PositionwiseFeedForward,
        dropout: float,
        pre_norm: bool = True,
    ):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.sublayer = clones(SublayerConnection(size, dropout, pre_norm), 2)
        self.size = size

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.sublayer[0](x, lambda x: self.self_attn(x, x, x, mask))
        return self.sublayer[1](x, self.feed_forward)


class Encoder(nn.Module):
    """A stack of N encoder layers (and a final norm when the blocks are pre-norm).

    Shape:
        x (B, S, d_model), mask (B, 1, S) -> (B, S, d_model).
    """

    def __init__(self, layer: EncoderLayer, N: int, pre_norm: bool = True):
        super().__init__()
        self.layers = clones(layer, N)
        # Post-norm blocks already end in a norm; pre-norm ones need one at the top.
        self.norm = nn.LayerNorm(layer.size) if pre_norm else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class DecoderLayer(nn.Module):
    """Self-attention, encoder-decoder ("source") attention, then feed-forward."""

    def __init__(
        self,
        size: int,
        self_attn: MultiHeadedAttention,
        src_attn: MultiHeadedAttention,
        feed_forward: PositionwiseFeedForward,
        dropout: float,
        pre_norm: bool = True,
    ):
        super().__init__()
        self.size = size
        self.self_attn = self_attn
        self.src_attn = src_attn
        self.feed_forward = feed_forward
        self.sublayer = clones(SublayerConnection(size, dropout, pre_norm), 3)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        src_mask: Tensor,
        tgt_mask: Tensor | None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        m = memory
        self_cache = cache.self_attn if cache is not None else None
        src_cache = cache.src_attn if cache is not None else None
        x = self.sublayer[0](x, lambda x: self.self_attn(x, x, x, tgt_mask, cache=self_cache))
        x = self.sublayer[1](x, lambda x: self.src_attn(x, m, m, src_mask, cache=src_cache))
        return self.sublayer[2](x, self.feed_forward)


class Decoder(nn.Module):
    """A stack of N decoder layers (and a final norm when the blocks are pre-norm).

    Shape:
        x (B, T, d_model), memory (B, S, d_model), src_mask (B, 1, S),
        tgt_mask (B, T, T_total) or None -> (B, T, d_model).
    """

    def __init__(self, layer: DecoderLayer, N: int, pre_norm: bool = True):
        super().__init__()
        self.layers = clones(layer, N)
        self.norm = nn.LayerNorm(layer.size) if pre_norm else nn.Identity()

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        src_mask: Tensor,
        tgt_mask: Tensor | None,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, src_mask, tgt_mask, cache.layers[i] if cache is not None else None)
        return self.norm(x)


class Embeddings(nn.Module):
    """Token embeddings multiplied by √d_model.

    The scaling keeps embeddings (initialised with small values) on the same scale as
    the positional encodings they are added to.
    """

    def __init__(self, d_model: int, vocab: int):
        super().__init__()
        self.lut = nn.Embedding(vocab, d_model)
        self.d_model = d_model

    def forward(self, x: Tensor) -> Tensor:
        return self.lut(x) * math.sqrt(self.d_model)


def sinusoid_table(max_len: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    Each (sin, cos) pair turns at its own frequency, so PE(pos + k) is PE(pos) rotated
    pair by pair by angles that depend on k only: a linear map of PE(pos).

    Shape:
        returns (max_len, d_model).
    """
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (max_len, 1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
    return pe


class PositionalEncoding(nn.Module):
    """Add sinusoidal position encodings, then dropout.

    The table is a non-persistent buffer: it is rebuilt, not stored in checkpoints.
    """

    def __init__(self, d_model: int, dropout: float, max_len: int = 5000):
        super().__init__()
        self.dropout = Dropout(p=dropout)
        self.register_buffer("pe", sinusoid_table(max_len, d_model).unsqueeze(0), persistent=False)

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """Shape: x (B, T, d_model); positions offset .. offset+T-1 (``offset`` (B,): per row)."""
        if isinstance(offset, Tensor):  # rows that started decoding at different steps
            positions = offset.view(-1, 1) + torch.arange(x.size(1), device=x.device)  # (B, T)
            end, pe = int(positions.max()) + 1, self.pe[0, positions]
        else:
            end, pe = offset + x.size(1), self.pe[:, offset:offset + x.size(1)]
        if end > self.pe.size(1):
            raise ValueError(f"sequence of {end} positions is longer than the positional table ({self.pe.size(1)})")
        return self.dropout(x + pe.to(x.dtype))


class TokenEmbedding(nn.Sequential):
    """``Embeddings`` followed by ``PositionalEncoding``, as the reference's ``nn.Sequential``,
    but able to start the positions at an offset (incremental decoding)."""

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:  # type: ignore[override]
        return self[1](self[0](x), offset=offset)


class Generator(nn.Module):
    """The final linear projection to the vocabulary, then log-softmax (in at least float32,
    so that under bf16/fp16 autocast the normalisation is not done in half precision)."""

    def __init__(self, d_model: int, vocab: int):
        super().__init__()
        self.proj = nn.Linear(d_model, vocab)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.proj(x)
        return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


class EncoderDecoder(nn.Module):
    """A standard encoder-decoder architecture: the base of this and many other models."""

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        src_embed: TokenEmbedding,
        tgt_embed: TokenEmbedding,
        generator: Generator,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.src_embed = src_embed
        self.tgt_embed = tgt_embed
        self.generator = generator

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor, tgt_mask: Tensor) -> Tensor:
        """Take in and process masked source and target sequences.

        Shape:
            src (B, S), tgt (B, T), src_mask (B, 1, S), tgt_mask (B, T, T) -> (B, T, d_model).
        """
        return self.decode(self.encode(src, src_mask), src_mask, tgt, tgt_mask)

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """Shape: src (B, S), src_mask (B, 1, S) -> memory (B, S, d_model)."""
        return self.encoder(self.src_embed(src), src_mask)

    @overload
    def decode(self, memory: Tensor, src_mask: Tensor, tgt: Tensor, tgt_mask: Tensor | None) -> Tensor: ...

    @overload
    def decode(
        self, memory: Tensor | None, src_mask: Tensor, tgt: Tensor, tgt_mask: Tensor | None, cache: DecoderCache
    ) -> tuple[Tensor, DecoderCache]: ...

    def decode(self, memory, src_mask, tgt, tgt_mask, cache=None):
        """Run the decoder over ``tgt``.

        Without a cache, ``tgt`` is the whole target prefix and the result is its hidden
        states. With a cache (see ``DecoderCache.empty``), ``tgt`` holds only the new
        positions; earlier keys and values come from the cache, the encoder-decoder keys
        and values are computed once, and the updated cache is returned with the states.
        A ``tgt_mask`` of None then means "causal among the new positions" (and each row's
        own keys, for rows at different steps); ``memory`` may then be None once cached.

        Shape:
            memory (B, S, d_model), src_mask (B, 1, S), tgt (B, T_new),
            tgt_mask (B, T_new, T_past + T_new) -> (B, T_new, d_model).
        """
        if cache is None:
            return self.decoder(self.tgt_embed(tgt), memory, src_mask, tgt_mask)
        past, new = cache.length, tgt.size(1)
        if tgt_mask is None:
            tgt_mask = cache.self_attention_mask(new, tgt.device)
        x = self.decoder(self.tgt_embed(tgt, offset=past), memory, src_mask, tgt_mask, cache)
        cache.length = past + new
        return x, cache

    def new_cache(self, memory: Tensor | None = None) -> DecoderCache:
        """An empty cache for decoding with this model (with ``memory``'s keys made already)."""
        cache = DecoderCache.empty(len(self.decoder.layers))
        if memory is not None:
            for layer, layer_cache in zip(self.decoder.layers, cache.layers):
                layer_cache.src_attn.update(*layer.src_attn.keys_values(memory, memory))
        return cache

    def logits(self, x: Tensor) -> Tensor:
        """The output layer's scores before the log-softmax (argmax and top-k need no more).

        Shape: (..., d_model) -> (..., tgt_vocab)."""
        return self.generator.proj(x)

    @property
    def d_model(self) -> int:
        return self.src_embed[0].d_model

    @property
    def max_positions(self) -> int:
        """The longest sequence the positional table covers."""
        return self.src_embed[1].pe.size(1)

    @property
    def src_vocab(self) -> int:
        return self.src_embed[0].lut.num_embeddings

    @property
    def tgt_vocab(self) -> int:
        return self.generator.proj.out_features


def make_model(
    src_vocab: int,
    tgt_vocab: int,
    N: int = 6,
    d_model: int = 512,
    d_ff: int = 2048,
    h: int = 8,
    dropout: float = 0.1,
    *,
    norm: str = "pre",
    attention: str = "sdpa",
    tie_embeddings: bool = False,
    max_len: int = 5000,
) -> EncoderDecoder:
    """Construct a model from hyperparameters, with Xavier-uniform initialisation.

    Args:
        src_vocab, tgt_vocab: vocabulary sizes.
        N: layers in the encoder and in the decoder.
        d_model, d_ff, h, dropout: width, feed-forward width, heads, dropout.
        norm: "pre" (the reference) or "post" (the paper).
        attention: "sdpa" (``F.scaled_dot_product_attention``) or "explicit".
        tie_embeddings: share one matrix between the source and target embeddings and
            the generator's projection. Needs one vocabulary for both sides.
        max_len: longest sequence the positional table covers.
    """
    if norm not in ("pre", "post"):
        raise ValueError(f"norm must be 'pre' or 'post', not {norm!r}")
    if attention not in ("sdpa", "explicit"):
        raise ValueError(f"attention must be 'sdpa' or 'explicit', not {attention!r}")
    if tie_embeddings and src_vocab != tgt_vocab:
        raise ValueError(
            f"tie_embeddings needs one vocabulary shared by source and target, "
            f"but their sizes differ ({src_vocab} vs {tgt_vocab})"
        )
    pre_norm = norm == "pre"
    c = copy.deepcopy
    attn = MultiHeadedAttention(h, d_model, dropout, use_sdpa=attention == "sdpa")
    ff = PositionwiseFeedForward(d_model, d_ff, dropout)
    position = PositionalEncoding(d_model, dropout, max_len)
    model = EncoderDecoder(
        Encoder(EncoderLayer(d_model, c(attn), c(ff), dropout, pre_norm), N, pre_norm),
        Decoder(DecoderLayer(d_model, c(attn), c(attn), c(ff), dropout, pre_norm), N, pre_norm),
        TokenEmbedding(Embeddings(d_model, src_vocab), c(position)),
        TokenEmbedding(Embeddings(d_model, tgt_vocab), c(position)),
        Generator(d_model, tgt_vocab),
    )
    if tie_embeddings:
        shared = model.src_embed[0].lut.weight
        model.tgt_embed[0].lut.weight = shared
        model.generator.proj.weight = shared
    # Initialise parameters with Glorot / fan_avg (a tied matrix is visited once).
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    return model
