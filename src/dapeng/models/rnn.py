"""Recurrent text encoders (RNN, GRU, LSTM) for sequence classification and per-token tagging.

Embeddings → stacked (bi)directional recurrent layers over packed sequences → pooling → dropout → linear.
"""

from __future__ import annotations

import torch
from torch import nn

from dapeng.layers.pooling import pool_sequence
from dapeng.layers.recurrent import RecurrentEncoder


class RecurrentClassifier(nn.Module):
    """A recurrent text model; registered as `rnn`, `gru` and `lstm` (see the factories below).

    Args:
        kind: "rnn", "gru" or "lstm".
        vocab_size: token vocabulary size.
        num_labels: classes (per text, or per token with pooling="none").
        pad_id: id of the padding token.
        embed_dim: embedding size (50 for GloVe-6B-50d).
        hidden: hidden size per direction.
        layers: stacked recurrent layers.
        bidirectional: read the text both ways.
        dropout: on embeddings, between layers, and before the head.
        pooling: "last" (final states of both directions), "mean", "max", or "none" for per-token outputs.
    """

    def __init__(
        self,
        kind: str,
        vocab_size: int,
        num_labels: int = 2,
        pad_id: int = 0,
        embed_dim: int = 128,
        hidden: int = 128,
        layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.3,
        pooling: str = "last",
    ) -> None:
        super().__init__()
        if pooling not in ("last", "mean", "max", "none"):
            raise ValueError(f"unknown pooling {pooling!r} for {kind}; choose last, mean, max or none")
        self.pooling = pooling
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.encoder = RecurrentEncoder(kind, embed_dim, hidden, layers, bidirectional, dropout)
        self.dropout = nn.Dropout(dropout)
        self.num_features = self.encoder.output_size
        self.head = nn.Linear(self.num_features, num_labels)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask.bool() if attention_mask is not None else None
        x = self.dropout(self.embedding(input_ids))  # (B, T, E)
        outputs, final = self.encoder(x, mask)  # (B, T, dirs·H), (B, dirs·H)
        if self.pooling == "last":
            return final
        return pool_sequence(outputs, mask, self.pooling)  # (B, dirs·H) or (B, T, dirs·H)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))  # (B, K) or (B, T, K)

    def reset_head(self, num_labels: int) -> None:
        self.head = nn.Linear(self.num_features, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids, (B, T) bool mask (right padding) → (B, K) logits, or (B, T, K) with pooling="none"."""
        return self.forward_head(self.forward_features(input_ids, attention_mask))


def rnn(**kwargs: object) -> RecurrentClassifier:
    """Elman RNN (tanh) text model; keyword arguments as `RecurrentClassifier` without `kind`."""
    return RecurrentClassifier("rnn", **kwargs)


def gru(**kwargs: object) -> RecurrentClassifier:
    """GRU text model; keyword arguments as `RecurrentClassifier` without `kind`."""
    return RecurrentClassifier("gru", **kwargs)


def lstm(**kwargs: object) -> RecurrentClassifier:
    """LSTM text model; keyword arguments as `RecurrentClassifier` without `kind`."""
    return RecurrentClassifier("lstm", **kwargs)
