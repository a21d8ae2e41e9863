"""Multi-head attention through `F.scaled_dot_product_attention`, with grouped-query heads and a KV cache.

Attention weights are never materialised on the normal path (SDPA picks a fused kernel).
Inside `capture_attention(model)` every attention layer computes them explicitly as well
and appends them, in call order, to the list the context manager yields.

Masks follow one convention everywhere: a bool tensor broadcastable to (B, H, T, S),
True where a query may attend to a key. Models build a mask once per forward pass
(`padding_mask`, `causal_mask`) and hand it to every layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.layers.fused import MIN_ROWS, linear, project_together
from dapeng.layers.positions import apply_rotary


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) bool/int, True for real tokens → (B, 1, 1, S) bool key mask.

    A row with no real token at all attends to everything, so SDPA never sees an
    all-False row (which would make NaNs).
    """
    keep = attention_mask.bool()
    return (keep | ~keep.any(dim=1, keepdim=True))[:, None, None, :]


def causal_mask(t: int, s: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) bool mask where query i (the last T of S positions) sees keys 0 … S-T+i."""
    s = t if s is None else s
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def _per_row(mask: torch.Tensor | None) -> bool:
    """Whether `mask` is None or the same for every head and query of a row: (B or 1, 1, 1, S)."""
    return mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)


# CPU SDPA multiplies bf16 probabilities by values in a GEMM that runs the keys in blocks of this many
KEY_BLOCK = 16


def _pad_keys(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pad bf16/fp16 keys and values on the CPU with masked zeros to a multiple of `KEY_BLOCK`.

    A query's output sums its weighted values over the S keys in fp32 and rounds once to
    bf16; how that sum is blocked depends on S, the batch's longest text, so a text's
    outputs rounded differently alone than batched (1 ulp here and there, which the layers
    above amplify). With S a multiple of 16 a text's real keys fall into the same blocks,
    the rest being masked zeros, and its outputs are the same bits for every S (measured
    from 16 to 512 keys). fp32 rounds ~1e-7 apart and is left alone; masks are bool.
    """
    s = k.shape[2]
    # the length test comes last: fp32 then never branches on S (torch.export keeps S dynamic)
    if (
        k.device.type != "cpu"
        or k.dtype not in (torch.bfloat16, torch.float16)
        or (mask is not None and mask.dtype != torch.bool)
        or -s % KEY_BLOCK == 0
    ):
        return k, v, mask
    extra = -s % KEY_BLOCK
    if mask is None:
        mask = torch.ones(1, 1, 1, s, dtype=torch.bool, device=k.device)
    mask = F.pad(mask.expand(*mask.shape[:-1], s), (0, extra), value=False)  # (…, S + extra)
    return F.pad(k, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra)), mask


class KVCache:
    """A preallocated (static) key/value cache for one attention layer.

    Keys and values are written in place at `pos`; attention reads the prefix
    `[:pos + T]`. Nothing is reallocated while generating.

    Args:
        batch: number of sequences.
        kv_heads: number of key/value heads.
        max_len: capacity in positions.
        head_dim: size of each head.
        dtype: storage dtype.
        device: storage device.
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, Hkv, T, Dh) keys/values at `pos`; return the cached prefix (B, Hkv, pos + T, Dh)."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search): row i becomes old row index[i]."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """Multi-head (and grouped-query) attention with projections `q`, `k`, `v`, `o`.

    Args:
        dim: model width of the queries' input.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA when fewer than `num_heads`; default: `num_heads`).
        head_dim: size of each head (default: `dim // num_heads`).
        bias: whether q/k/v/o have biases (BERT: yes; Llama: no).
        dropout: attention-probability dropout while training.
        kv_dim: width of the keys' input for cross-attention (default: `dim`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        kv_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        self.head_dim = head_dim or dim // num_heads
        self.dropout = dropout
        kv_dim = kv_dim or dim
        self.q = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.k = nn.Linear(kv_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(kv_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(num_heads * self.head_dim, dim, bias=bias)
        # set by capture_attention: a list to append (B, H, T, S) weights to, or None
        self.record: list[torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        pos: int = 0,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend from `x` (B, T, D) to `context` (B, S, D') or to itself.

        Args:
            x: queries' input.
            context: keys' and values' input for cross-attention; None for self-attention.
            mask: bool, broadcastable to (B, H, T, S), True where attention is allowed.
            causal: also forbid keys after each query (aligned so the last query sees every key).
            rope: (cos, sin) from `RotaryEmbedding` to rotate queries and keys.
            cache: a KVCache to write this step's keys/values into at `pos` and read the prefix from.
            pos: position of x's first token in the cache.
            kv: keys and values already projected by `project_kv` (cross-attention while decoding).
        """
        b, t, _ = x.shape
        rotated = None
        if kv is None and context is None and rope is not None and cache is None:
            rotated = self._project_rotated(x, rope)
        if rotated is not None:
            q, k, v = rotated
        else:
            if kv is None and context is None:
                q, k, v = project_together(x, (self.q, self.k, self.v))
                k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
                v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
            else:
                q = linear(x, self.q)
                k, v = kv if kv is not None else self.project_kv(context)  # (B, Hkv, S, Dh) each
            q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, pos)
        s = k.shape[2]
        if causal and t == 1:
            causal = False  # the one query, aligned to the last key, sees every key
        elif causal and (mask is not None or s != t):
            cm = causal_mask(t, s, device=x.device)
            mask = cm if mask is None else mask & cm
            causal = False
        group = self.num_heads // self.num_kv_heads
        dropout = self.dropout if self.training else 0.0
        if self.record is None and t == 1 and group > 1 and not causal and _per_row(mask):
            # one query per head (decoding): the heads sharing a key/value head attend as its
            # `group` queries, so each cached key/value is read once instead of once per head
            qg = q.view(b, self.num_kv_heads, group, self.head_dim)  # (B, Hkv, G, Dh)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, dropout_p=dropout)
            y = y.view(b, self.num_heads, 1, self.head_dim)  # (B, H, 1, Dh)
        elif self.record is None:
            if not causal and cache is None:
                k, v, mask = _pad_keys(k, v, mask)
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                enable_gqa=group > 1,
            )
        else:
            y = self._attend_explicitly(q, k, v, mask, causal)
        return linear(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim), self.o)  # (B, T, D)

    def _project_rotated(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Rotated queries and keys, and values, from one GEMM and one complex product; None where it doesn't apply.

        For fp32 self-attention without a cache over enough rows (training, encoding): the q and k
        weight rows of each head are reordered from rotate-half order (x1…, x2…) to pairs
        (x1_0, x2_0, x1_1, …) inside the fused weight copy that is built anyway, so the rotation
        of queries and keys together is one complex multiplication (forward and backward) instead
        of mul/roll/mul/add per tensor. Both come out in the same reordered dims, which leaves
        every score q·k, hence the output, unchanged; a KV cache keeps the plain order.
        """
        layers = (self.q, self.k, self.v)
        if (
            x.dtype != torch.float32
            or self.head_dim % 2
            or x.numel() // x.shape[-1] < MIN_ROWS
            or not all(type(layer) is nn.Linear and layer.weight.dtype == torch.float32 for layer in layers)
            or (self.q.bias is None) != (self.k.bias is None) or (self.q.bias is None) != (self.v.bias is None)
            or torch.is_autocast_enabled(x.device.type)  # autocast would run the product in bf16
            or torch.compiler.is_compiling()
        ):
            return None
        b, t, _ = x.shape
        h, hkv, half = self.num_heads, self.num_kv_heads, self.head_dim // 2

        def pairs(w: torch.Tensor, heads: int) -> torch.Tensor:  # rows (heads·Dh, …) in pair order
            return w.view(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

        weight = torch.cat([pairs(self.q.weight, h), pairs(self.k.weight, hkv), self.v.weight])
        bias = None
        if self.q.bias is not None:
            bias = torch.cat([pairs(self.q.bias, h), pairs(self.k.bias, hkv), self.v.bias])
        # split, not slicing: the backward of a split is one concatenation, that of each slice a
        # zero-filled full-size gradient
        qk, v = F.linear(x, weight, bias).split([(h + hkv) * self.head_dim, hkv * self.head_dim], dim=-1)
        cos, sin = rope  # (1 or B, 1, T, Dh); sin carries rotate-half's sign in its first half
        turn = torch.complex(cos[..., :half], sin[..., half:]).transpose(1, 2)  # (1 or B, T, 1, Dh/2)
        qk = torch.view_as_complex(qk.view(b, t, h + hkv, half, 2)) * turn
        q, k = torch.view_as_real(qk).flatten(-2).split([h, hkv], dim=2)  # (B, T, H | Hkv, Dh)
        v = v.view(b, t, hkv, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H | Hkv, T, Dh)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project (B, S, D') inputs to keys and values, each (B, Hkv, S, Dh)."""
        b, s, _ = context.shape
        k = linear(context, self.k).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = linear(context, self.v).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def _attend_explicitly(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        """Softmax attention with the weights in hand, recorded for `capture_attention`."""
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
        if causal:
            mask = causal_mask(q.shape[2], k.shape[2], device=q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.float().softmax(dim=-1).to(q.dtype)  # (B, H, T, S)
        self.record.append(weights)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        return weights @ v  # (B, H, T, Dh)


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the attention weights of every `MultiHeadAttention` in `model` while inside the block.

    Yields a list that fills, in call order (layer order), with one (B, H, T, S) tensor per
    attention call; rows sum to 1. The model's outputs are unchanged.

    Example:
        >>> with capture_attention(model) as maps:
        ...     logits = model(input_ids, attention_mask)
        >>> len(maps)  # number of attention layers
    """
    maps: list[torch.Tensor] = []
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    for layer in layers:
        layer.record = maps
    try:
        yield maps
    finally:
        for layer in layers:
            layer.record = None
