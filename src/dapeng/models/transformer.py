"""A Transformer encoder laid out like BERT (Devlin et al. 2019), for classification, tagging and embeddings.

Module names mirror BERT's so converted checkpoints (e.g. MiniLM-L6) load one-to-one:

    embeddings.word / .position / .token_type / .norm
    layers[i].attn.q / .k / .v / .o, layers[i].norm1, layers[i].ffn.up / .down, layers[i].norm2

(The Hugging Face name mapping lives in `dapeng.hub`, not here.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.errors import ModelError
from dapeng.layers.attention import padding_mask
from dapeng.layers.blocks import EncoderBlock
from dapeng.layers.crf import CRF
from dapeng.layers.feedforward import _ACTIVATIONS
from dapeng.layers.pooling import pool_sequence
from dapeng.layers.positions import LearnedPositions


class Embeddings(nn.Module):
    """Word + learned absolute position + token-type embeddings, then LayerNorm and dropout (BERT)."""

    def __init__(
        self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int, pad_id: int, eps: float, dropout: float
    ) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden, padding_idx=pad_id)
        self.position = LearnedPositions(max_positions, hidden)
        self.token_type = nn.Embedding(type_vocab_size, hidden) if type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        # positions 0…T-1 are the table's first T rows: a slice, cheaper than a lookup (and its backward)
        x = self.word(input_ids) + self.position.weight[:t]  # (B, T, D)
        if self.token_type is not None:
            # BERT adds type 0 when no segment ids are given
            x = x + (self.token_type(token_type_ids) if token_type_ids is not None else self.token_type.weight[0])
        return self.dropout(self.norm(x))


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense + activation + LayerNorm, then a decoder tied to the word embeddings.

    The decoder has only its own bias: its weight is the (V, D) input embedding table,
    passed in at call time, so the head adds D² + 3D + V parameters, not another V × D.
    """

    def __init__(self, hidden: int, vocab_size: int, eps: float, activation: str) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        self.dense = nn.Linear(hidden, hidden)
        self.activation = activation
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """(N, D) hidden states, (V, D) embedding table → (N, V) token logits."""
        x = self.norm(_ACTIVATIONS[self.activation](self.dense(hidden)))  # (N, D)
        return F.linear(x, embedding, self.bias)  # (N, V)


class TransformerEncoder(nn.Module):
    """BERT-layout encoder with a pooling + linear head.

    Args:
        vocab_size: token vocabulary size.
        num_labels: classes (per text, or per token with pooling="none").
        pad_id: id of the padding token.
        hidden: model width (MiniLM-L6: 384).
        layers: encoder blocks (MiniLM-L6: 6).
        heads: attention heads (MiniLM-L6: 12).
        intermediate: feed-forward inner width (MiniLM-L6: 1536).
        max_positions: longest input (BERT: 512).
        type_vocab_size: segment types (BERT: 2; 0 for none).
        layer_norm_eps: LayerNorm epsilon (BERT: 1e-12).
        norm_first: pre-LN blocks plus a final LayerNorm; False is BERT's post-LN.
        dropout: embedding, attention and residual dropout, and before the head.
        pooling: "cls" (first token), "mean", "max" or "none" (per-token outputs for tagging).
        activation: feed-forward activation ("gelu": exact erf, as BERT).
        crf: with pooling="none", carry a `CRF` over the per-token logits (`self.crf`, None otherwise)
            for the tagging task to train and decode with; `forward` still returns the logits.
        mlm_head: carry a `MaskedLMHead` tied to the word embeddings (`self.mlm`, None otherwise)
            for masked-LM pretraining (`mlm_logits`); a run that starts from such a model
            (`model.init`) for another task leaves it behind.
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int = 2,
        pad_id: int = 0,
        hidden: int = 256,
        layers: int = 4,
        heads: int = 4,
        intermediate: int = 1024,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        norm_first: bool = False,
        dropout: float = 0.1,
        pooling: str = "mean",
        activation: str = "gelu",
        crf: bool = False,
        mlm_head: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean", "max", "none"):
            raise ValueError(f"unknown pooling {pooling!r} for transformer; choose cls, mean, max or none")
        if crf and pooling != "none":
            raise ValueError(f"crf tags tokens: it needs pooling='none', not {pooling!r}")
        self.pooling = pooling
        self.max_positions = max_positions
        self.embeddings = Embeddings(vocab_size, hidden, max_positions, type_vocab_size, pad_id, layer_norm_eps, dropout)
        self.layers = nn.ModuleList(
            EncoderBlock(hidden, heads, intermediate, dropout, layer_norm_eps, norm_first, activation)
            for _ in range(layers)
        )
        self.final_norm = nn.LayerNorm(hidden, eps=layer_norm_eps) if norm_first else None
        self.dropout = nn.Dropout(dropout)
        self.num_features = hidden
        self.head = nn.Linear(hidden, num_labels)
        self.apply(_init_bert)
        self.crf: CRF | None = CRF(num_labels) if crf else None
        self.mlm = MaskedLMHead(hidden, vocab_size, layer_norm_eps, activation) if mlm_head else None
        if self.mlm is not None:
            _init_bert(self.mlm.dense)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) → final hidden states (B, T, D) (BERT's `last_hidden_state`)."""
        if input_ids.shape[1] > self.max_positions:
            raise ModelError(
                f"input of {input_ids.shape[1]} tokens exceeds max_positions={self.max_positions}",
                "truncate the input or build the model with a larger max_positions",
            )
        attention_mask = _drop_if_unpadded(attention_mask)
        mask = padding_mask(attention_mask) if attention_mask is not None else None  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, D)
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_norm(x) if self.final_norm is not None else x

    def forward_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled features (B, D), or per-token (B, T, D) with pooling="none"."""
        attention_mask = _drop_if_unpadded(attention_mask)
        x = self.encode(input_ids, attention_mask, token_type_ids)
        return pool_sequence(x, attention_mask.bool() if attention_mask is not None else None, self.pooling)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (N, D) of the positions to predict → (N, V) vocabulary logits."""
        if self.mlm is None:
            raise ModelError("this transformer has no masked-LM head", "build it with mlm_head: true")
        return self.mlm(hidden, self.embeddings.word.weight)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))  # (B, K) or (B, T, K)

    def reset_head(self, num_labels: int) -> None:
        self.head = nn.Linear(self.num_features, num_labels)
        _init_bert(self.head)
        if self.crf is not None:
            self.crf = CRF(num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids, (B, T) bool mask → (B, K) logits, or (B, T, K) with pooling="none"."""
        return self.forward_head(self.forward_features(input_ids, attention_mask, token_type_ids))


def _drop_if_unpadded(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None for a batch without padding: attention and pooling then take their faster mask-free paths.

    Checked eagerly only; under torch.compile a data-dependent branch would break the graph.
    """
    if attention_mask is None or torch.compiler.is_compiling() or not bool(attention_mask.all()):
        return attention_mask
    return None


def _init_bert(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm, zero padding row."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, LearnedPositions):
        nn.init.normal_(module.weight, std=0.02)
