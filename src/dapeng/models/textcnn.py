"""Kim's convolutional network for sentence classification (Kim 2014).

Embeddings → parallel 1-D convolutions of several widths → ReLU → max over time → dropout → linear.
With `pooling="none"` the per-token conv features go to the head instead (tagging).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.layers.pooling import pool_sequence


class TextCNN(nn.Module):
    """Kim-style text CNN.

    Args:
        vocab_size: token vocabulary size.
        num_labels: classes (per text, or per token with pooling="none").
        pad_id: id of the padding token (its embedding stays zero).
        embed_dim: embedding size (50 for GloVe-6B-50d).
        kernel_sizes: widths of the parallel convolutions.
        filters: output channels per width.
        dropout: on the embeddings and before the head.
        pooling: "max" (max over time, Kim), "mean", or "none" for per-token outputs.
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int = 2,
        pad_id: int = 0,
        embed_dim: int = 128,
        kernel_sizes: tuple[int, ...] = (3, 4, 5),
        filters: int = 100,
        dropout: float = 0.5,
        pooling: str = "max",
    ) -> None:
        super().__init__()
        if pooling not in ("max", "mean", "none"):
            raise ValueError(f"unknown pooling {pooling!r} for textcnn; choose max, mean or none")
        self.pooling = pooling
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, filters, k) for k in kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.num_features = filters * len(kernel_sizes)
        self.head = nn.Linear(self.num_features, num_labels)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask.bool() if attention_mask is not None else None
        x = self.embedding(input_ids)  # (B, T, E)
        if mask is not None:
            # zero padded positions so a real token's window sees the same thing however long the padding
            x = x * mask.unsqueeze(-1).to(x.dtype)
        x = self.dropout(x).transpose(1, 2)  # (B, E, T)
        feats = []
        for conv in self.convs:
            k = conv.kernel_size[0]
            # asymmetric "same" padding keeps exactly T outputs for even widths too
            feats.append(F.relu(conv(F.pad(x, ((k - 1) // 2, k // 2)))))  # (B, F, T)
        h = torch.cat(feats, dim=1).transpose(1, 2)  # (B, T, F·n)
        if self.pooling == "none":
            return h
        return pool_sequence(h, mask, self.pooling)  # (B, F·n)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))  # (B, K) or (B, T, K)

    def reset_head(self, num_labels: int) -> None:
        self.head = nn.Linear(self.num_features, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids, (B, T) bool mask → (B, K) logits, or (B, T, K) with pooling="none"."""
        return self.forward_head(self.forward_features(input_ids, attention_mask))
