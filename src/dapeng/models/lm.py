"""A decoder-only language model laid out like Llama (Touvron et al. 2023), with fast KV-cache generation.

Pre-RMSNorm blocks, rotary positions (rotate-half layout, base `rope_theta`), grouped-query
attention through SDPA's `enable_gqa` (keys/values are never repeated per head), SwiGLU
feed-forward, optionally tied input/output embeddings. Module names:

    embed, layers[i].norm1, layers[i].attn.q / .k / .v / .o, layers[i].norm2,
    layers[i].ffn.gate / .up / .down, norm, lm_head (absent when tied)

SmolLM2-135M: vocab_size=49152, hidden=576, layers=30, heads=9, kv_heads=3,
intermediate=1536, rope_theta=100000, rms_norm_eps=1e-5, tie_embeddings=True.

Decoding is eager and lean (per-op overhead dominates on CPU): one static, preallocated
KV cache per layer written in place, the RoPE tables gathered once per step for all layers,
no mask at all for unpadded batches, and the vocabulary projection only for the last position.
Products of a few rows go to `layers.cpu_matmul`'s kernel where it is built (x86-64 with
AVX2), which streams the weights as stored. bf16 weights on a CPU without native bf16 decode
with fp32 activations, KV cache and attention, the weights staying bf16 in memory
(`_activation_dtype`).

`DecodeBatch` serves continuous batching: sequences join (prefill) and leave between steps of
one running batch, each at its own position in its own row of the KV cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from dapeng._hardware import native_bf16
from dapeng.errors import ModelError
from dapeng.layers.attention import KVCache, MultiHeadAttention, causal_mask
from dapeng.layers.feedforward import SwiGLU
from dapeng.layers.fused import linear, linear_weight
from dapeng.layers.norms import RMSNorm
from dapeng.layers.positions import RotaryEmbedding
from dapeng.models.decoding import CacheRows, beam_search, sample_steps, select_token

__all__ = ["DecodeBatch", "LlamaLM", "select_token"]

class DecoderBlock(nn.Module):
    """`x + attn(norm1(x))`, then `x + ffn(norm2(x))` (Llama's pre-norm residual block)."""

    def __init__(
        self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float, dropout: float
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(hidden, eps)
        self.attn = MultiHeadAttention(hidden, heads, kv_heads, head_dim, bias=False, dropout=dropout)
        self.norm2 = RMSNorm(hidden, eps)
        self.ffn = SwiGLU(hidden, intermediate, dropout=dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        causal: bool,
        cache: KVCache | None = None,
        pos: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask, causal=causal, rope=rope, cache=cache, pos=pos)
        return x + self.ffn(self.norm2(x))  # (B, T, D)


class LlamaLM(nn.Module):
    """Llama-layout causal language model.

    Args:
        vocab_size: token vocabulary size.
        pad_id: id used to fill finished rows while generating (Llama itself has no padding row).
        hidden: model width.
        layers: decoder blocks.
        heads: query heads.
        kv_heads: key/value heads (grouped-query attention when fewer than `heads`).
        intermediate: SwiGLU inner width.
        head_dim: size of each head (default hidden // heads).
        max_positions: longest context (RoPE table size).
        rope_theta: RoPE base.
        rms_norm_eps: RMSNorm epsilon.
        tie_embeddings: reuse the input embedding matrix as the output projection.
        dropout: attention and residual dropout while training (Llama: 0).
        num_labels: output size of the head; default vocab_size (a language model).
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int = 0,
        hidden: int = 256,
        layers: int = 4,
        heads: int = 8,
        kv_heads: int = 4,
        intermediate: int = 768,
        head_dim: int | None = None,
        max_positions: int = 1024,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        tie_embeddings: bool = True,
        dropout: float = 0.0,
        num_labels: int | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.kv_heads = kv_heads
        self.head_dim = head_dim or hidden // heads
        self.max_positions = max_positions
        self.embed = nn.Embedding(vocab_size, hidden)
        self.rope = RotaryEmbedding(self.head_dim, max_positions, rope_theta)
        self.layers = nn.ModuleList(
            DecoderBlock(hidden, heads, kv_heads, self.head_dim, intermediate, rms_norm_eps, dropout)
            for _ in range(layers)
        )
        self.norm = RMSNorm(hidden, rms_norm_eps)
        self.num_features = hidden
        tied = tie_embeddings and (num_labels is None or num_labels == vocab_size)
        # tied: no lm_head module at all, so the state dict holds one copy (safetensors refuses shared tensors)
        self.lm_head = None if tied else nn.Linear(hidden, num_labels or vocab_size, bias=False)
        self.apply(_init_llama)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def _check_length(self, length: int) -> None:
        if length > self.max_positions:
            raise ModelError(
                f"{length} positions exceed max_positions={self.max_positions}",
                "shorten the prompt or max_new_tokens, or build the model with a larger max_positions",
            )

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) → final normed hidden states (B, T, D).

        `attention_mask` (B, T) marks real tokens; left or right padding both work, because
        positions count real tokens only and padded keys are masked.
        """
        t = input_ids.shape[1]
        self._check_length(t)
        x = self.embed(input_ids)  # (B, T, D)
        # an unpadded batch takes SDPA's fused causal path (checked eagerly only, see transformer.py)
        if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask = None
        if attention_mask is None:
            rope = self.rope(torch.arange(t, device=x.device), x.dtype)
            mask, causal = None, True
        else:
            keep = attention_mask.bool()
            rope = self.rope(_positions(keep), x.dtype)
            mask, causal = _prefix_mask(keep, t), False  # (B, 1, T, T)
        for layer in self.layers:
            x = layer(x, rope, mask, causal)
        return self.norm(x)

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(input_ids, attention_mask)  # (B, T, D)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            tied = getattr(self.embed, "linear", None)  # a quantized table projects by its own kernel
            return tied(features) if tied is not None else linear_weight(features, self.embed.weight)  # (…, V)
        return linear(features, self.lm_head)

    def reset_head(self, num_labels: int) -> None:
        """A fresh, untied (hidden → num_labels) output projection."""
        self.lm_head = nn.Linear(self.num_features, num_labels, bias=False)
        _init_llama(self.lm_head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids → (B, T, V) next-token logits."""
        return self.forward_head(self.forward_features(input_ids, attention_mask))

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """One preallocated KVCache per layer for `batch` sequences of up to `max_len` positions."""
        self._check_length(max_len)
        weight = self._float_weight()
        return [
            KVCache(batch, self.kv_heads, max_len, self.head_dim, dtype or weight.dtype, weight.device)
            for _ in self.layers
        ]

    def decode_batch(self) -> DecodeBatch:
        """An empty `DecodeBatch`: sequences that join and leave a running batch between steps."""
        return DecodeBatch(self)

    def _activation_dtype(self) -> torch.dtype:
        """The dtype generation computes in: the weights', except bf16 weights on a CPU without native bf16.

        There every bf16 operation widens to fp32 and rounds back element by element, and a
        bf16 matrix product of several rows runs reference kernels several times slower than
        fp32. So activations, the KV cache and attention stay fp32 while the weights stay bf16
        in memory: products read them as bf16 (`layers.fused.linear_weight`), with fp32
        accumulation.
        """
        weight = self._float_weight()
        if (
            weight.dtype == torch.bfloat16
            and weight.device.type == "cpu"
            and not native_bf16()
            and self._plain_layers()
        ):
            return torch.float32
        return weight.dtype

    def _float_weight(self) -> torch.Tensor:
        """A weight in the model's float dtype and device: the final norm's (an int8 embedding
        table would have to be dequantized to be read as a float weight)."""
        return self.norm.weight

    def _plain_layers(self) -> bool:
        """Whether every module holding weights is a plain Linear/RMSNorm/Embedding (not LoRA-wrapped, quantized…)."""
        plain = (nn.Linear, RMSNorm, nn.Embedding)
        return all(type(m) in plain for m in self.modules() if next(m.parameters(recurse=False), None) is not None)

    def _step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        caches: list[KVCache],
        pos: int,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        """Run `input_ids` (B, T) written at cache slot `pos`; return logits of the last position (B, V)."""
        x = self.embed(input_ids).to(caches[0].k.dtype)  # (B, T, D), in the activation dtype
        rope = self.rope(positions, x.dtype)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rope, mask, causal, cache, pos)
        return self.forward_head(self.norm(x[:, -1]))  # (B, V)

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_ids: Sequence[int] = (),
        stream: bool = False,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
        no_repeat_ngram_size: int = 0,
        min_new_tokens: int = 0,
    ) -> torch.Tensor | Iterator[int | list[int]]:
        """Continue prompts with a KV cache: greedy when temperature is 0, else sampled; beam search with num_beams > 1.

        Args:
            input_ids: (B, T) prompts; left-pad a batch of different lengths and pass `attention_mask`.
            max_new_tokens: tokens to add at most.
            temperature: 0 picks the most likely token; otherwise logits are divided by it and sampled.
            top_k: sample only among the k most likely tokens.
            top_p: sample only from the smallest set of tokens whose probability reaches p (nucleus).
            stop_ids: a row ends after producing one of these (kept in the output); generation stops
                when every row has ended, and ended rows are filled with `pad_id`.
            stream: return an iterator over new tokens instead (an int per step for one row,
                a list of ints per step for a batch); not with beam search.
            attention_mask: (B, T) bool, True for real prompt tokens.
            generator: random generator for reproducible sampling.
            num_beams: beams per prompt; above 1 the best hypothesis of `decoding.beam_search` is returned.
            length_penalty, early_stopping: beam search's (see `decoding.beam_search`).
            no_repeat_ngram_size: no n-gram of this size repeats among the new tokens (0: off).
            min_new_tokens: stop_ids are forbidden before this many new tokens.

        Returns:
            (B, T + new) token ids, prompts included; or the iterator when streaming.
        """
        if num_beams > 1:
            if stream:
                raise ModelError("beam search cannot stream", "drop stream=True, or decode with num_beams=1")
            result = beam_search(
                self, input_ids, attention_mask, max_new_tokens, num_beams, eos_ids=stop_ids, pad_id=self.pad_id,
                min_new_tokens=min_new_tokens, length_penalty=length_penalty, early_stopping=early_stopping,
                no_repeat_ngram_size=no_repeat_ngram_size,
            )
            return torch.cat([input_ids, result.sequences[:, 0]], dim=1)
        steps = self._generate_steps(
            input_ids, max_new_tokens, temperature, top_k, top_p, stop_ids, attention_mask, generator,
            min_new_tokens, no_repeat_ngram_size,
        )
        if stream:
            return _as_python(steps, input_ids.shape[0])
        new = list(steps)
        if not new:
            return input_ids.clone()
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)

    @torch.inference_mode()
    def _generate_steps(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        stop_ids: Sequence[int],
        attention_mask: torch.Tensor | None,
        generator: torch.Generator | None,
        min_new_tokens: int = 0,
        no_repeat_ngram_size: int = 0,
    ) -> Iterator[torch.Tensor]:
        """Yield (B,) new tokens, one step at a time."""
        yield from sample_steps(
            self, input_ids, attention_mask, max_new_tokens, eos_ids=stop_ids, pad_id=self.pad_id,
            min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            no_repeat_ngram_size=no_repeat_ngram_size, generator=generator,
        )

    @torch.inference_mode()
    def start_decoding(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, expand: int, max_new_tokens: int
    ) -> tuple[_LMDecodeState, torch.Tensor]:
        """Prefill the prompts once, then give each `expand` rows of the KV cache (see `decoding.Decodable`)."""
        b, t = input_ids.shape
        total = t + max_new_tokens
        caches = self.new_cache(b, total, self._activation_dtype())
        device = input_ids.device
        if attention_mask is None or bool(attention_mask.all()):
            keys = None
            logits = self._step(input_ids, torch.arange(t, device=device), caches, 0, None, True)
            next_pos = torch.tensor([t], device=device)
        else:
            keys = torch.ones(b, total, dtype=torch.bool, device=device)
            keys[:, :t] = attention_mask.bool()
            positions = _positions(keys[:, :t])  # (B, T)
            logits = self._step(input_ids, positions, caches, 0, _prefix_mask(keys[:, :t], t), False)
            next_pos = positions[:, -1:] + 1  # (B, 1)
        if expand > 1:
            for cache in caches:
                cache.k = cache.k.repeat_interleave(expand, dim=0)
                cache.v = cache.v.repeat_interleave(expand, dim=0)
            logits = logits.repeat_interleave(expand, dim=0)
            keys = keys.repeat_interleave(expand, dim=0) if keys is not None else None
            next_pos = next_pos.repeat_interleave(expand, dim=0) if next_pos.dim() == 2 else next_pos
        return _LMDecodeState(self, caches, keys, next_pos, t), logits


class _LMDecodeState:
    """`LlamaLM`'s `decoding.DecodeState`: the KV cache rows of every beam, one token a step."""

    def __init__(
        self, model: LlamaLM, caches: list[KVCache], keys: torch.Tensor | None, next_pos: torch.Tensor, pos: int
    ) -> None:
        self.model = model
        self.caches = caches
        self.rows = CacheRows(caches)
        self.keys = keys  # (R, total) real keys when prompts are padded; None: all real
        self.next_pos = next_pos  # position of the next token: (1,) for all rows, or (R, 1)
        self.pos = pos  # cache slot the next token is written to

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = self.pos
        # one query per row attends to every cached key: no causal mask is needed
        mask = None if self.keys is None else self.keys[:, None, None, : pos + 1]
        logits = self.model._step(tokens[:, None], self.next_pos, self.caches, pos, mask, False)
        self.next_pos = self.next_pos + 1
        self.pos = pos + 1
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        self.rows.reorder(index, self.pos)


class _RowCache:
    """One layer's keys/values for the rows of a `DecodeBatch`: (rows, Hkv, length, Dh), grown on demand.

    `MultiHeadAttention` calls `update(k, v, pos)` as it would on a `KVCache`; where the
    entries go comes from the batch's `_Where` (shared by every layer) instead of `pos`.
    """

    def __init__(self, where: _Where, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.where = where
        self.k = torch.zeros(0, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` rows of `length` positions, keeping what is stored."""
        have_rows, _, have_len, _ = self.k.shape
        if rows <= have_rows and length <= have_len:
            return
        shape = (max(rows, have_rows), self.k.shape[1], max(length, have_len), self.k.shape[3])
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(shape)
            new[:have_rows, :, :have_len] = old
            setattr(self, name, new)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        where = self.where
        if where.prefill is not None:  # new rows (B, Hkv, T, Dh) from position 0: they attend to themselves
            first = where.prefill
            self.k[first : first + k.shape[0], :, : k.shape[2]] = k
            self.v[first : first + k.shape[0], :, : k.shape[2]] = v
            return k, v
        n = k.shape[0]  # one new entry per running row, each at its own position
        self.k[where.rows[:n], :, where.positions] = k[:, :, 0]
        self.v[where.rows[:n], :, where.positions] = v[:, :, 0]
        return self.k[:n, :, : where.end], self.v[:n, :, : where.end]


class _Where:
    """Where the current forward pass of a `DecodeBatch` writes: new rows from `prefill`, or one entry per row."""

    def __init__(self, device: torch.device) -> None:
        self.prefill: int | None = None
        self.positions = torch.zeros(0, dtype=torch.long, device=device)  # (n,)
        self.rows = torch.zeros(0, dtype=torch.long, device=device)
        self.end = 0


class DecodeBatch:
    """A running batch of sequences that share decoding steps; each joins and leaves on its own.

    Row i of the KV cache holds sequence i at its own length, so a sequence can join (its
    prompt is prefilled into a free row) or leave (the last row moves into its place)
    between any two steps. One step feeds every row its last token and returns the next
    logits of all rows; queries see only their own row's entries (a per-row key mask).

        batch = model.decode_batch()
        logits = batch.add([[1, 2, 3], [4, 5]])   # (2, V): prompts prefilled into rows 0 and 1
        logits = batch.step([7, 9])               # (2, V): one token more for each row
        batch.remove(0)                           # row 1 moves into row 0

    Args:
        model: the language model.
        growth: positions added per row when the cache runs out (it also doubles).
    """

    def __init__(self, model: LlamaLM, growth: int = 64) -> None:
        self.model = model
        self.growth = growth
        self.device = model._float_weight().device
        self.where = _Where(self.device)
        dtype = model._activation_dtype()
        self.caches = [_RowCache(self.where, model.kv_heads, model.head_dim, dtype, self.device) for _ in model.layers]
        self.lengths: list[int] = []  # entries stored per row

    @property
    def size(self) -> int:
        """Sequences in the batch (rows 0 … size-1)."""
        return len(self.lengths)

    def _reserve(self, rows: int, length: int) -> None:
        self.model._check_length(length)
        have_rows, _, have_len, _ = self.caches[0].k.shape
        if rows <= have_rows and length <= have_len:
            return
        rows = max(rows, 2 * have_rows)
        length = min(max(length, 2 * have_len, self.growth), self.model.max_positions) if length > have_len else have_len
        for cache in self.caches:
            cache.reserve(rows, length)
        self.where.rows = torch.arange(rows, device=self.device)

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prefill `prompts` into new rows at the end; return their next-token logits (len(prompts), V).

        The prompts run as one right-padded batch: causal attention keeps each real token
        from seeing the padding after it, and a row's padded entries are overwritten by
        its next tokens before any query may see them.
        """
        lengths = [len(p) for p in prompts]
        if not lengths or min(lengths) < 1:
            raise ModelError("every prompt needs at least one token")
        first, width = self.size, max(lengths)
        self._reserve(first + len(prompts), width + 1)
        ids = torch.full((len(prompts), width), self.model.pad_id, dtype=torch.long, device=self.device)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        x = self.model.embed(ids).to(self.caches[0].k.dtype)  # (B, T, D)
        rope = self.model.rope(torch.arange(width, device=self.device), x.dtype)
        self.where.prefill = first
        try:
            for layer, cache in zip(self.model.layers, self.caches):
                x = layer(x, rope, None, True, cache, 0)  # type: ignore[arg-type]
        finally:
            self.where.prefill = None
        last = x[torch.arange(len(prompts), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        self.lengths.extend(lengths)
        return self.model.forward_head(self.model.norm(last))  # (B, V)

    @torch.inference_mode()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append one token to every row (`tokens[i]` to row i); return the next logits (size, V)."""
        n = self.size
        if len(tokens) != n:
            raise ModelError(f"a step of {n} rows got {len(tokens)} tokens")
        end = max(self.lengths) + 1
        self._reserve(n, end)
        positions = torch.tensor(self.lengths, dtype=torch.long, device=self.device)  # (n,)
        self.where.positions, self.where.end = positions, end
        keys = torch.arange(end, device=self.device)[None, :] <= positions[:, None]  # (n, S): own entries only
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]  # (n, 1)
        logits = self.model._step(ids, positions[:, None], self.caches, 0, keys[:, None, None, :], False)  # type: ignore[arg-type]
        self.lengths = [length + 1 for length in self.lengths]
        return logits

    @torch.inference_mode()
    def remove(self, row: int) -> None:
        """Drop row `row`; the last row moves into its place (callers mirror that move)."""
        last = self.size - 1
        if not 0 <= row <= last:
            raise ModelError(f"no row {row} in a batch of {self.size}")
        if row != last:
            for cache in self.caches:
                cache.k[row] = cache.k[last]
                cache.v[row] = cache.v[last]
            self.lengths[row] = self.lengths[last]
        self.lengths.pop()


def _positions(keep: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left-padded rows start at 0: (B, T) long."""
    return (keep.long().cumsum(dim=1) - 1).clamp_min(0)


def _prefix_mask(keep: torch.Tensor, t: int) -> torch.Tensor:
    """(B, 1, T, T): causal and no padded keys; each query may always see itself, so padded rows aren't NaN."""
    allowed = causal_mask(t, device=keep.device) & keep[:, None, None, :]
    return allowed | torch.eye(t, dtype=torch.bool, device=keep.device)


def _as_python(steps: Iterator[torch.Tensor], batch: int) -> Iterator[int | list[int]]:
    for token in steps:
        yield int(token[0]) if batch == 1 else token.tolist()


def _init_llama(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
