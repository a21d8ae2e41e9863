"""An encoder-decoder Transformer (Vaswani et al. 2017) for sequence-to-sequence tasks (translation, summarization).

Shared or separate token embeddings scaled by √D plus sinusoidal positions; an encoder of
`EncoderBlock`s; a decoder whose blocks add cross-attention over the encoder's output; an
output projection tied to the target embeddings. Pre-LN by default (stabler from scratch).
Generation (greedy, sampling, beam search) runs through `models.decoding`, with a static KV
cache for decoder self-attention and the cross-attention keys/values projected once per source.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.errors import ModelError
from dapeng.layers.attention import KVCache, MultiHeadAttention, padding_mask
from dapeng.layers.blocks import EncoderBlock
from dapeng.layers.feedforward import FeedForward
from dapeng.layers.positions import SinusoidalPositions
from dapeng.models.decoding import CacheRows, beam_search, sample_steps


class CrossDecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the source, feed-forward; each residual with LayerNorm."""

    def __init__(
        self, dim: int, heads: int, intermediate: int, dropout: float, eps: float, norm_first: bool
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(dim, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = MultiHeadAttention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, intermediate, "gelu")
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def _sublayer(self, x: torch.Tensor, norm: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.norm_first:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))

    def forward(
        self,
        x: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        self_mask: torch.Tensor | None,
        memory_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        pos: int = 0,
    ) -> torch.Tensor:
        """(B, T, D) target states → (B, T, D); `cross_kv` from `cross_attn.project_kv(memory)`."""
        causal = x.shape[1] > 1  # a single new token may see every cached one
        x = self._sublayer(x, self.norm1, lambda h: self.self_attn(h, mask=self_mask, causal=causal, cache=cache, pos=pos))
        x = self._sublayer(x, self.norm2, lambda h: self.cross_attn(h, mask=memory_mask, kv=cross_kv))
        return self._sublayer(x, self.norm3, self.ffn)


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer.

    Args:
        vocab_size: source vocabulary size (also the target's unless `tgt_vocab_size` is given).
        pad_id: padding id (both sides).
        bos_id: id that starts every decoder input.
        eos_id: id that ends a target sequence.
        tgt_vocab_size: target vocabulary size when it differs from the source's.
        hidden: model width.
        layers: encoder blocks.
        decoder_layers: decoder blocks (default: `layers`).
        heads: attention heads.
        intermediate: feed-forward inner width.
        max_positions: longest source or target.
        dropout: embedding, attention and residual dropout.
        norm_first: pre-LN blocks with final LayerNorms (False: the original post-LN).
        layer_norm_eps: LayerNorm epsilon.
        tie_embeddings: project outputs with the target embedding matrix.
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        tgt_vocab_size: int | None = None,
        hidden: int = 256,
        layers: int = 3,
        decoder_layers: int | None = None,
        heads: int = 4,
        intermediate: int = 1024,
        max_positions: int = 512,
        dropout: float = 0.1,
        norm_first: bool = True,
        layer_norm_eps: float = 1e-5,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.max_positions = max_positions
        self.scale = math.sqrt(hidden)
        tgt_vocab_size = tgt_vocab_size or vocab_size
        self.src_embed = nn.Embedding(vocab_size, hidden, padding_idx=pad_id)
        # a shared vocabulary shares one matrix; no alias module, since safetensors refuses shared tensors
        self.tgt_embed = (
            None if tgt_vocab_size == vocab_size else nn.Embedding(tgt_vocab_size, hidden, padding_idx=pad_id)
        )
        self.positions = SinusoidalPositions(hidden, max_positions)
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(
            EncoderBlock(hidden, heads, intermediate, dropout, layer_norm_eps, norm_first) for _ in range(layers)
        )
        self.decoder = nn.ModuleList(
            CrossDecoderBlock(hidden, heads, intermediate, dropout, layer_norm_eps, norm_first)
            for _ in range(decoder_layers or layers)
        )
        self.encoder_norm = nn.LayerNorm(hidden, eps=layer_norm_eps) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(hidden, eps=layer_norm_eps) if norm_first else nn.Identity()
        self.num_features = hidden
        self.head = None if tie_embeddings else nn.Linear(hidden, tgt_vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=hidden**-0.5)
                with torch.no_grad():
                    m.weight[pad_id].zero_()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.src_embed

    @property
    def target_embeddings(self) -> nn.Embedding:
        return self.src_embed if self.tgt_embed is None else self.tgt_embed

    def _embed(self, embedding: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        end = start + ids.shape[1]
        if end > self.max_positions:
            raise ModelError(
                f"{end} positions exceed max_positions={self.max_positions}",
                "truncate the input or build the model with a larger max_positions",
            )
        x = embedding(ids) * self.scale + self.positions(torch.arange(start, end, device=ids.device))
        return self.dropout(x)  # (B, T, D)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) → memory (B, S, D)."""
        mask = padding_mask(attention_mask) if attention_mask is not None else None
        x = self._embed(self.src_embed, input_ids)
        for block in self.encoder:
            x = block(x, mask)
        return self.encoder_norm(x)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Target ids (B, T) attending to memory (B, S, D) → decoder states (B, T, D) (teacher forcing)."""
        memory_mask = padding_mask(attention_mask) if attention_mask is not None else None
        self_mask = padding_mask(decoder_attention_mask) if decoder_attention_mask is not None else None
        x = self._embed(self.target_embeddings, decoder_input_ids)
        for block in self.decoder:
            x = block(x, block.cross_attn.project_kv(memory), self_mask, memory_mask)
        return self.decoder_norm(x)

    def forward_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if decoder_input_ids is None:
            raise ModelError("seq2seq needs decoder_input_ids", "pass the target shifted right, starting with bos_id")
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)  # (B, T, D)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return F.linear(features, self.target_embeddings.weight)  # (…, V)
        return self.head(features)

    def reset_head(self, num_labels: int) -> None:
        """A fresh, untied (hidden → num_labels) output projection."""
        self.head = nn.Linear(self.num_features, num_labels, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Source (B, S) and decoder inputs (B, T) → (B, T, V) next-token logits."""
        return self.forward_head(
            self.forward_features(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        )

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        *,
        early_stopping: bool = False,
        no_repeat_ngram_size: int = 0,
        min_new_tokens: int = 0,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Translate/summarize a batch of sources.

        Args:
            input_ids: (B, S) source ids.
            attention_mask: (B, S) bool, True for real source tokens.
            max_new_tokens: longest output.
            num_beams: 1 for greedy decoding (or sampling), more for beam search.
            length_penalty: beam scores are log-probabilities divided by length ** length_penalty.
            early_stopping: beam search ends an input once it holds num_beams finished hypotheses.
            no_repeat_ngram_size: no n-gram of this size repeats in an output (0: off).
            min_new_tokens: eos_id is forbidden before this many tokens.
            temperature, top_k, top_p, generator: sampling when temperature > 0 (num_beams 1).

        Returns:
            (B, 1 + n) ids starting with bos_id; rows that ended early are filled with pad_id after eos_id.
        """
        eos = (self.eos_id,)
        if num_beams > 1:
            new = beam_search(
                self, input_ids, attention_mask, max_new_tokens, num_beams, eos_ids=eos, pad_id=self.pad_id,
                min_new_tokens=min_new_tokens, length_penalty=length_penalty, early_stopping=early_stopping,
                no_repeat_ngram_size=no_repeat_ngram_size,
            ).sequences[:, 0]
        else:
            steps = sample_steps(
                self, input_ids, attention_mask, max_new_tokens, eos_ids=eos, pad_id=self.pad_id,
                min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                no_repeat_ngram_size=no_repeat_ngram_size, generator=generator,
            )
            new = torch.stack(list(steps), dim=1)
        bos = torch.full((input_ids.shape[0], 1), self.bos_id, dtype=torch.long, device=input_ids.device)
        return torch.cat([bos, new], dim=1)

    @torch.inference_mode()
    def start_decoding(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, expand: int, max_new_tokens: int
    ) -> tuple[_Seq2SeqDecodeState, torch.Tensor]:
        """Encode the sources and project each layer's cross-attention keys/values once, then repeat them per beam."""
        memory = self.encode(input_ids, attention_mask)  # (B, S, D)
        cross = [block.cross_attn.project_kv(memory) for block in self.decoder]
        memory_mask = padding_mask(attention_mask) if attention_mask is not None else None
        if expand > 1:
            cross = [(k.repeat_interleave(expand, dim=0), v.repeat_interleave(expand, dim=0)) for k, v in cross]
            memory_mask = memory_mask.repeat_interleave(expand, dim=0) if memory_mask is not None else None
        rows = input_ids.shape[0] * expand
        attn = self.decoder[0].self_attn
        caches = [
            KVCache(rows, attn.num_kv_heads, max_new_tokens, attn.head_dim, memory.dtype, memory.device)
            for _ in self.decoder
        ]
        state = _Seq2SeqDecodeState(self, cross, memory_mask, caches)
        bos = torch.full((rows,), self.bos_id, dtype=torch.long, device=input_ids.device)
        return state, state.step(bos)


class _Seq2SeqDecodeState:
    """`Seq2SeqTransformer`'s `decoding.DecodeState`: self-attention KV cache per row, cross K/V per source."""

    def __init__(
        self,
        model: Seq2SeqTransformer,
        cross: list[tuple[torch.Tensor, torch.Tensor]],
        memory_mask: torch.Tensor | None,
        caches: list[KVCache],
    ) -> None:
        self.model = model
        self.cross = cross  # per layer (R, H, S, Dh) keys and values of the source
        self.memory_mask = memory_mask
        self.caches = caches
        self.rows = CacheRows(caches)
        self.pos = 0  # decoder position of the next token

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        model, pos = self.model, self.pos
        x = model._embed(model.target_embeddings, tokens[:, None], start=pos)  # (R, 1, D)
        for block, kv, cache in zip(model.decoder, self.cross, self.caches):
            x = block(x, kv, None, self.memory_mask, cache, pos)
        self.pos = pos + 1
        return model.forward_head(model.decoder_norm(x[:, -1]))  # (R, V)

    def reorder(self, index: torch.Tensor) -> None:
        self.rows.reorder(index, self.pos)
