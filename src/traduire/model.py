"""The Transformer of Vaswani et al. (2017), "Attention Is All You Need", from torch.nn modules.

Read top to bottom it follows the paper: embeddings and positions, multi-head attention, the
position-wise feed-forward network, the encoder and decoder layers, the encoder and decoder
stacks, and the encoder-decoder model that ties them together.

Conventions: token tensors are (batch, length) of ids; hidden states are (batch, length, d_model);
boolean masks are True where attention is *allowed*, as `scaled_dot_product_attention` expects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traduire import kernels
from traduire.config import ModelConfig, encoder_decoder_layers
from traduire.kernels import Dropout

# The defaults of every model setting are the config's: one place to read and change them.
_DEFAULT = ModelConfig()


@dataclass(frozen=True)
class TransformerShape:
    """Everything needed to build the network: the model section of the config, resolved,
    plus the vocabulary sizes and the padding id."""

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = _DEFAULT.d_model
    heads: int = _DEFAULT.heads
    ffn_dim: int = _DEFAULT.ffn_dim
    encoder_layers: int = _DEFAULT.layers
    decoder_layers: int = _DEFAULT.layers
    dropout: float = _DEFAULT.dropout
    attention_dropout: float = _DEFAULT.attention_dropout
    activation_dropout: float = _DEFAULT.activation_dropout  # inside the FFN, after activation
    activation: str = _DEFAULT.activation
    norm: str = _DEFAULT.norm  # "pre" (LayerNorm before each sublayer) or "post" (the paper's)
    max_positions: int = _DEFAULT.max_positions
    # One matrix for the source and target embeddings. The output projection is tied to the
    # target embedding whatever this says (section 3.4).
    share_embeddings: bool = _DEFAULT.share_embeddings
    scale_embedding: bool = _DEFAULT.scale_embedding
    output_bias: bool = _DEFAULT.output_bias  # a learned score offset per target token
    pad_id: int = 0

    @classmethod
    def from_config(cls, model: ModelConfig, src_vocab_size: int, tgt_vocab_size: int,
                    pad_id: int) -> TransformerShape:
        """The network the model section of a config describes."""
        same = {f.name for f in fields(cls)} & {f.name for f in fields(model)}
        encoder_layers, decoder_layers = encoder_decoder_layers(model)
        return cls(src_vocab_size, tgt_vocab_size, encoder_layers=encoder_layers,
                   decoder_layers=decoder_layers, pad_id=pad_id,
                   **{name: getattr(model, name) for name in same - {"encoder_layers",
                                                                      "decoder_layers"}})


# --- Embeddings and positions ----------------------------------------------------------------


class TokenEmbedding(nn.Module):
    """Token embeddings scaled by sqrt(d_model) (section 3.4): keeps their magnitude comparable
    to the sinusoidal positions they are added to. (`scale=False` leaves them as they are, as
    some published models do.)"""

    def __init__(self, vocab_size: int, d_model: int, pad_id: int, scale: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.pad_id = pad_id
        self.scale = math.sqrt(d_model) if scale else 1.0
        # std d^-1/2 so that after scaling by sqrt(d) the embeddings have unit variance.
        nn.init.normal_(self.weight, mean=0.0, std=d_model**-0.5)
        with torch.no_grad():
            self.weight[pad_id].zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight, padding_idx=self.pad_id) * self.scale


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position encodings (section 3.5); a buffer, not a parameter.

    Dimension 2i holds sin(pos / 10000^(2i/d)) and 2i+1 the cosine (the paper's interleaving).
    Other layouts (Marian puts every sine before every cosine) are the same encoding with the
    dimensions permuted: see huggingface.py. Computed in float64, then rounded, so that the
    table is the same to the last bit whichever toolkit computed it."""

    def __init__(self, d_model: int, max_positions: int) -> None:
        super().__init__()
        position = torch.arange(max_positions, dtype=torch.float64).unsqueeze(1)
        inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
        table = torch.zeros(max_positions, d_model, dtype=torch.float64)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq)[:, :d_model // 2]
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """Encodings for positions offset .. offset+length-1, shaped (length, d_model)."""
        if offset + length > self.table.size(0):
            raise ValueError(f"sequence of {offset + length} positions exceeds "
                             f"model.max_positions={self.table.size(0)}")
        return self.table[offset:offset + length]


# --- Attention -------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
              dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention (section 3.2.1):

        Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

    for q (batch, heads, q_len, d_k) and k, v (batch, heads, k_len, d_k). Each query's scores
    are scaled by 1/sqrt(d_k) so that their variance does not grow with d_k, which would push
    the softmax into regions of tiny gradients. `mask` (boolean, broadcastable to (batch,
    heads, q_len, k_len), True where attention is allowed) sets the scores of the keys a query
    may not see to -inf, so they get zero weight; a floating-point mask (`additive_mask`) is
    added to the scores instead, to the same effect. Dropout acts on the weights. The softmax
    runs in float32 whatever the inputs' precision. Returns the output and the weights.
    """
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    weights = scores.softmax(dim=-1)
    return kernels.dropout(weights, dropout_p, dropout_p > 0).to(v.dtype) @ v, weights


def causal_mask(q_len: int, k_len: int, device: torch.device, mask: Tensor | None = None
                ) -> Tensor:
    """Query i may see keys up to i: a lower-triangular mask, aligned so that the last query
    sees the last key (as in a cached decoding step); combined with `mask` if given."""
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    if mask is not None and mask.dtype != torch.bool:  # an additive mask
        return mask.masked_fill(~causal, float("-inf"))
    return causal if mask is None else mask & causal


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = may attend) as the equivalent additive one: 0 where attention is
    allowed, -inf where not, in the dtype the attention's queries will have: the autocast dtype
    under autocast, else `dtype` (the weights'); a floating-point mask is returned as it is.

    The fused kernels take an additive mask as it is, while a boolean one is converted to this
    form inside every call (twice per decoder layer and once per encoder layer each step);
    flash attention takes neither, and the memory-efficient and cuDNN kernels take the additive
    form. Made once per forward pass, it serves every layer."""
    if mask.dtype != torch.bool:
        return mask
    device = mask.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf"))


class MultiHeadAttention(nn.Module):
    """Multi-head attention (section 3.2.2): each of `heads` heads computes `attention` on its
    own d_model / heads dimensions, and the heads' outputs are concatenated and projected back
    to d_model:

        MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,
        head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

    Self-attention projects queries, keys and values with one packed matrix (one matrix product
    instead of three); cross-attention projects queries from the decoder and keys/values from
    the encoder output. `kv_cache`, when given, keeps this layer's past keys and values (a
    DecoderCache's: a dict of the encoder output's for cross-attention, a SelfAttentionCache for
    self-attention), so incremental decoding never recomputes them.
    """

    def __init__(self, d_model: int, heads: int, dropout: float, cross: bool) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.heads = heads
        self.head_dim = d_model // heads
        self.cross = cross
        self.dropout = dropout
        if cross:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, memory: Tensor | None = None, mask: Tensor | None = None,
                causal: bool = False,
                kv_cache: dict[str, Tensor] | SelfAttentionCache | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attend from x (batch, tgt_len, d) to itself or, for cross-attention, to memory.

        For cross-attention, x may hold g rows per row of memory (batch = g * memory batch):
        rows i*g .. i*g+g-1 attend to memory row i, as beam search's hypotheses do.
        mask: boolean, broadcastable to (batch, heads, tgt_len, src_len), True = may attend;
        for cross-attention it has memory's batch size.
        causal: position i attends to positions <= i only (decoder self-attention).
        Returns the output and, if need_weights, the weights (batch, heads, tgt_len, src_len).
        """
        rows, q_len, _ = x.shape
        if self.cross:
            if kv_cache is not None and "k" in kv_cache:
                k, v = kv_cache["k"], kv_cache["v"]  # the encoder output does not change
            else:
                k, v = (self._split_heads(t) for t in self.kv_proj(memory).chunk(2, dim=-1))
                if kv_cache is not None:
                    kv_cache["k"], kv_cache["v"] = k, v
            # Beam search gives each source `group` consecutive rows of x, one per hypothesis.
            # They share one encoder output, so their queries attend together, as one longer
            # query sequence, instead of each row carrying its own copy of the source.
            # (// and %, not divmod, which torch.compile cannot trace on dynamic sizes)
            group, uneven = rows // k.size(0), rows % k.size(0)
            if uneven or not group:
                raise ValueError(f"{rows} query rows cannot share {k.size(0)} memory rows evenly")
            q = self._split_heads(self.q_proj(x).reshape(k.size(0), group * q_len, -1))
        else:
            q, k, v = (self._split_heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))
            if kv_cache is not None:
                # Written in place after the cached positions; k and v become views of every
                # position so far.
                k, v = kv_cache.append(k, v)
                # One new query per step attends to every cached key: nothing in the future
                # exists yet, so no causal mask is needed for a single step.
                causal = causal and q.size(2) > 1

        dropout = self.dropout if self.training else 0.0
        # The same function through torch's fused kernel where that measured faster; a plain
        # causal square then stays a flag, since the fused kernels apply causality themselves.
        fused = not need_weights and kernels.fused_attention_wins(q)
        if causal and not (fused and mask is None and q.size(2) == k.size(2)):
            mask, causal = causal_mask(q.size(2), k.size(2), q.device, mask), False
        if fused:
            out, weights = kernels.fused_attention(q, k, v, mask, causal, dropout), None
        else:
            out, weights = attention(q, k, v, mask, dropout)
            weights = weights if need_weights else None
        out = out.transpose(1, 2).reshape(rows, q_len, self.heads * self.head_dim)
        if weights is not None and weights.size(0) != rows:  # grouped cross-attention
            weights = (weights.unflatten(2, (-1, q_len)).transpose(1, 2)
                       .reshape(rows, self.heads, q_len, -1))
        return self.out_proj(out), weights


# --- Feed-forward ----------------------------------------------------------------------------


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = W2 act(W1 x + b1) + b2, applied to each position alone (section 3.3)."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float, activation: str) -> None:
        # dropout here is the *activation* dropout; the sublayer's output dropout is separate.
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.activation = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}[activation]
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class Sublayer(nn.Module):
    """Residual connection around a sublayer, with LayerNorm before it (pre-norm, stable
    without long warmup) or after the sum (post-norm, the paper's original arrangement)."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor, fn) -> tuple[Tensor, Tensor | None]:
        out, weights = fn(self.norm(x) if self.pre_norm else x)
        x = x + self.dropout(out)
        return (x if self.pre_norm else self.norm(x)), weights


# --- Layers ----------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """Bidirectional self-attention, then feed-forward: every source position sees every other."""

    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        pre = shape.norm == "pre"
        self.self_attn = MultiHeadAttention(shape.d_model, shape.heads, shape.attention_dropout,
                                            cross=False)
        self.ffn = PositionwiseFeedForward(shape.d_model, shape.ffn_dim,
                                           shape.activation_dropout, shape.activation)
        self.attn_block = Sublayer(shape.d_model, shape.dropout, pre)
        self.ffn_block = Sublayer(shape.d_model, shape.dropout, pre)

    def forward(self, x: Tensor, src_mask: Tensor, need_weights: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        x, weights = self.attn_block(
            x, lambda h: self.self_attn(h, mask=src_mask, need_weights=need_weights))
        x, _ = self.ffn_block(x, lambda h: (self.ffn(h), None))
        return x, weights


class DecoderLayer(nn.Module):
    """Causal self-attention over the target prefix, cross-attention over the encoder output,
    then feed-forward."""

    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        pre = shape.norm == "pre"
        d, h, p = shape.d_model, shape.heads, shape.attention_dropout
        self.self_attn = MultiHeadAttention(d, h, p, cross=False)
        self.cross_attn = MultiHeadAttention(d, h, p, cross=True)
        self.ffn = PositionwiseFeedForward(d, shape.ffn_dim, shape.activation_dropout,
                                           shape.activation)
        self.self_block = Sublayer(d, shape.dropout, pre)
        self.cross_block = Sublayer(d, shape.dropout, pre)
        self.ffn_block = Sublayer(d, shape.dropout, pre)

    def forward(self, x: Tensor, memory: Tensor, src_mask: Tensor,
                cache: dict[str, dict[str, Tensor]] | None = None, need_weights: bool = False
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        x, self_weights = self.self_block(x, lambda h: self.self_attn(
            h, causal=True, kv_cache=self_cache, need_weights=need_weights))
        x, cross_weights = self.cross_block(x, lambda h: self.cross_attn(
            h, memory, mask=src_mask, kv_cache=cross_cache, need_weights=need_weights))
        x, _ = self.ffn_block(x, lambda h: (self.ffn(h), None))
        return x, self_weights, cross_weights


# --- Stacks ----------------------------------------------------------------------------------


@dataclass
class AttentionWeights:
    """Attention weights collected on request, one (batch, heads, q_len, k_len) tensor per layer."""

    encoder: list[Tensor]
    decoder_self: list[Tensor]
    decoder_cross: list[Tensor]


class Encoder(nn.Module):
    def __init__(self, shape: TransformerShape, embedding: TokenEmbedding,
                 positions: SinusoidalPositions) -> None:
        super().__init__()
        self.embedding, self.positions = embedding, positions
        self.dropout = Dropout(shape.dropout)
        self.layers = nn.ModuleList(EncoderLayer(shape) for _ in range(shape.encoder_layers))
        # Pre-norm leaves the residual stream unnormalised; one final LayerNorm fixes its scale.
        self.final_norm = nn.LayerNorm(shape.d_model) if shape.norm == "pre" else nn.Identity()

    def forward(self, src: Tensor, src_mask: Tensor, weights: list[Tensor] | None = None
                ) -> Tensor:
        x = self.dropout(self.embedding(src) + self.positions(src.size(1)))
        for layer in self.layers:
            x, w = layer(x, src_mask, need_weights=weights is not None)
            if weights is not None:
                weights.append(w)
        return self.final_norm(x)


class Decoder(nn.Module):
    def __init__(self, shape: TransformerShape, embedding: TokenEmbedding,
                 positions: SinusoidalPositions) -> None:
        super().__init__()
        self.embedding, self.positions = embedding, positions
        self.dropout = Dropout(shape.dropout)
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.decoder_layers))
        self.final_norm = nn.LayerNorm(shape.d_model) if shape.norm == "pre" else nn.Identity()

    def forward(self, tgt: Tensor, memory: Tensor, src_mask: Tensor,
                cache: DecoderCache | None = None, attention: AttentionWeights | None = None
                ) -> Tensor:
        offset = cache.length if cache is not None else 0
        x = self.dropout(self.embedding(tgt) + self.positions(tgt.size(1), offset))
        for i, layer in enumerate(self.layers):
            x, self_w, cross_w = layer(x, memory, src_mask,
                                       cache.layers[i] if cache is not None else None,
                                       need_weights=attention is not None)
            if attention is not None:
                attention.decoder_self.append(self_w)
                attention.decoder_cross.append(cross_w)
        if cache is not None:
            cache.length += tgt.size(1)
        return self.final_norm(x)


class DecoderCache:
    """Keys and values of past target positions (and of the encoder output) for every decoder
    layer, so that each decoding step computes attention for the new token only.

    On a GPU the self-attention keys and values of every layer live in one preallocated
    tensor, `kv` (layers, 2, rows, heads, capacity, head_dim), written in place at each step's
    positions: a step copies nothing earlier steps cached, attention reads a view of the
    positions so far, and one reorder moves every layer's rows at once (only those whose place
    changes). It is allocated at the first step for `capacity` positions (the most a search
    will feed; it doubles, with one copy, if a caller feeds more).

    On a CPU each layer keeps contiguous keys and values instead, one position longer each
    step: torch's CPU matrix products copy a strided view before multiplying (the products of
    a decoding step over a view of the preallocated buffer measured 2-4x slower than over a
    contiguous tensor, bf16 and fp32, torch 2.13), and its in-place row copies (index_copy_,
    index_put_) were 5-10x slower than a fresh gather, so there the growing form copies less.
    `preallocate` forces either form.

    The cross-attention keys and values are the encoder output's, one row per source:
    `layers[i]["cross"]`. Beam search calls `reorder` when hypotheses are re-ranked or
    finished ones leave the batch.
    """

    def __init__(self, num_layers: int, capacity: int = 64, preallocate: bool | None = None
                 ) -> None:
        self.layers: list[dict] = [{"self": SelfAttentionCache(self, i), "cross": {}}
                                   for i in range(num_layers)]
        self.length = 0  # positions cached
        self.rows = 0  # batch rows in use (the first `rows` of kv)
        self.capacity = max(capacity, 1)
        self.preallocate = preallocate  # None: decided by the device at the first step
        self.kv: Tensor | None = None

    def _reserve(self, k: Tensor, end: int) -> None:
        """Room for positions up to `end` for the rows of `k` (called by the first layer)."""
        rows, heads, _, head_dim = k.shape
        if self.preallocate is None:
            self.preallocate = k.device.type != "cpu"
        if not self.preallocate:
            self.rows = rows
            return
        if self.kv is None:
            self.capacity = max(self.capacity, end)
            self.kv = k.new_empty((len(self.layers), 2, rows, heads, self.capacity, head_dim))
            self.rows = rows
        elif end > self.capacity:
            self.capacity = max(2 * self.capacity, end)
            grown = self.kv.new_empty((*self.kv.shape[:4], self.capacity, head_dim))
            grown[..., :self.length, :] = self.kv[..., :self.length, :]
            self.kv = grown
        if rows != self.rows:
            raise ValueError(f"{rows} rows fed to a decoder cache holding {self.rows}")

    def reorder(self, rows: Tensor | Sequence[int] | np.ndarray,
                sources: Tensor | Sequence[int] | np.ndarray | None = None) -> None:
        """Keep batch rows `rows` (in that order) of the self-attention keys and values and,
        when `sources` is given, rows `sources` of the cross-attention ones.

        Given on the host (a sequence or numpy array of ints), `rows` moves nothing where no
        row changes place and, in the preallocated form, only the rows that do (row r takes
        rows[r]); a tensor gathers them all, without reading it on the host. The
        cross-attention keys and values are the encoder output's, one row per source;
        re-ranking the hypotheses of the same sources leaves them as they are (sources=None).
        """
        count = rows.numel() if isinstance(rows, Tensor) else len(rows)
        moved = None
        if not isinstance(rows, Tensor):
            rows = np.asarray(rows, dtype=np.int64)
            moved = np.flatnonzero(rows != np.arange(count))
        if self.kv is not None:
            kv = self.kv[..., :self.length, :]
            if moved is None:
                kv[:, :, :count] = kv.index_select(2, rows.to(kv.device))
            elif len(moved):
                kv.index_copy_(2, device_index(moved, kv.device),
                               kv.index_select(2, device_index(rows[moved], kv.device)))
        else:
            for layer in self.layers:
                layer["self"].keep(rows, count if moved is not None and not len(moved) else None)
        self.rows = count
        if sources is not None:
            for layer in self.layers:
                cross = layer["cross"]
                for name, tensor in cross.items():
                    index = (sources.to(tensor.device) if isinstance(sources, Tensor)
                             else device_index(np.asarray(sources), tensor.device))
                    cross[name] = tensor.index_select(0, index)


class SelfAttentionCache:
    """One decoder layer's part of its DecoderCache's self-attention keys and values: a view of
    the preallocated buffer, or its own growing tensors (`k`, `v`: rows, heads, positions,
    head_dim)."""

    def __init__(self, cache: DecoderCache, layer: int) -> None:
        self.cache, self.layer = cache, layer
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions' keys and values (rows, heads, new, head_dim) after the
        cached ones; returns all of them."""
        cache = self.cache
        start, end = cache.length, cache.length + k.size(2)
        if self.layer == 0:
            cache._reserve(k, end)
        if not cache.preallocate:
            if self.k is not None:
                k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            self.k, self.v = k, v
            return k, v
        kv = cache.kv[self.layer, :, :k.size(0)]
        kv[0, :, :, start:end] = k
        kv[1, :, :, start:end] = v
        return kv[0, :, :, :end], kv[1, :, :, :end]

    def keep(self, rows: np.ndarray | Tensor, first: int | None) -> None:
        """The growing form's reorder: rows `rows`, or where `first` is given, the first rows
        as they are (no copy)."""
        if self.k is None:
            return
        if first is not None:
            self.k, self.v = self.k[:first], self.v[:first]
            return
        index = rows if isinstance(rows, Tensor) else device_index(rows, self.k.device)
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)

    def __contains__(self, name: str) -> bool:
        return name in ("k", "v") and (self.cache.kv is not None or self.k is not None)

    def __getitem__(self, name: str) -> Tensor:
        """The cached keys ("k") or values ("v"), (rows, heads, positions, head_dim)."""
        cache = self.cache
        if name not in self:
            raise KeyError(name)
        if cache.kv is None:
            return self.k if name == "k" else self.v
        return cache.kv[self.layer, ("k", "v").index(name), :cache.rows, :, :cache.length]


def device_index(values: np.ndarray, device: torch.device) -> Tensor:
    """Host indices as an int64 tensor on `device`: shared with numpy on the CPU; elsewhere
    copied from pinned memory without waiting on the device."""
    index = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if device.type == "cpu":
        return index
    return index.pin_memory().to(device, non_blocking=True)


# --- The encoder-decoder model ---------------------------------------------------------------


class Transformer(nn.Module):
    """Encoder-decoder Transformer: encode the source once, then predict the target token by
    token, each prediction conditioned on the source and the target prefix."""

    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.shape = shape
        if shape.share_embeddings and shape.src_vocab_size != shape.tgt_vocab_size:
            raise ValueError("shared embeddings need one joint vocabulary")
        positions = SinusoidalPositions(shape.d_model, shape.max_positions)
        tgt_embedding = TokenEmbedding(shape.tgt_vocab_size, shape.d_model, shape.pad_id,
                                       shape.scale_embedding)
        src_embedding = (tgt_embedding if shape.share_embeddings
                         else TokenEmbedding(shape.src_vocab_size, shape.d_model, shape.pad_id,
                                             shape.scale_embedding))
        self.encoder = Encoder(shape, src_embedding, positions)
        self.decoder = Decoder(shape, tgt_embedding, positions)
        self.output_bias = (nn.Parameter(torch.zeros(shape.tgt_vocab_size))
                            if shape.output_bias else None)
        self._init_linear_layers()

    def _init_linear_layers(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def source_mask(self, src: Tensor) -> Tensor:
        """(batch, 1, 1, src_len) boolean mask: True on real tokens, False on padding."""
        return (src != self.shape.pad_id)[:, None, None, :]

    def encode(self, src: Tensor, attention: AttentionWeights | None = None
               ) -> tuple[Tensor, Tensor]:
        """Encode source ids (batch, src_len) into (memory, src_mask)."""
        src_mask = self.source_mask(src)
        # One additive mask serves every encoder layer (see additive_mask).
        memory = self.encoder(src, additive_mask(src_mask, self.decoder.embedding.weight.dtype),
                              attention.encoder if attention is not None else None)
        return memory, src_mask

    def decode(self, tgt: Tensor, memory: Tensor, src_mask: Tensor,
               cache: DecoderCache | None = None, attention: AttentionWeights | None = None
               ) -> Tensor:
        """Logits (batch, tgt_len, vocab) for the next token after each target prefix position.

        With a cache, `tgt` holds only the new positions; earlier ones come from the cache.
        `tgt` may have g rows per source (beam search's hypotheses): rows i*g .. i*g+g-1
        continue source i of memory and src_mask.
        """
        if cache is None:  # a teacher-forced pass (training): one mask for every layer
            src_mask = additive_mask(src_mask, self.decoder.embedding.weight.dtype)
        return self.project(self.decoder(tgt, memory, src_mask, cache, attention))

    def project(self, hidden: Tensor) -> Tensor:
        """Scores of every target token: the output projection, which reuses the target
        embedding matrix (section 3.4): one matrix maps tokens to vectors and vectors back to
        token scores; plus a learned bias per token where the model has one."""
        return F.linear(hidden, self.decoder.embedding.weight, self.output_bias)

    def forward(self, src: Tensor, tgt_in: Tensor, attention: AttentionWeights | None = None
                ) -> Tensor:
        """Teacher-forced logits for target inputs `tgt_in` (BOS + target, without EOS)."""
        memory, src_mask = self.encode(src, attention)
        return self.decode(tgt_in, memory, src_mask, attention=attention)

    def new_cache(self, capacity: int = 64) -> DecoderCache:
        """An empty decoder cache with room for `capacity` positions (it grows if needed)."""
        return DecoderCache(len(self.decoder.layers), capacity)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
