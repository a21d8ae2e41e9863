"""The Transformer encoder block shared by the BERT-layout encoder and the encoder-decoder."""

from __future__ import annotations

import torch
from torch import nn

from dapeng.layers.attention import MultiHeadAttention
from dapeng.layers.feedforward import FeedForward


class EncoderBlock(nn.Module):
    """Self-attention and feed-forward sublayers, each with a residual connection and LayerNorm.

    Post-LN (BERT, `norm_first=False`): `x = norm1(x + attn(x)); x = norm2(x + ffn(x))`.
    Pre-LN (`norm_first=True`): `x = x + attn(norm1(x)); x = x + ffn(norm2(x))`.

    Args:
        dim: model width.
        heads: attention heads.
        intermediate: feed-forward inner width.
        dropout: on attention probabilities and on each sublayer's output.
        eps: LayerNorm epsilon (BERT: 1e-12).
        norm_first: pre-LN instead of BERT's post-LN.
        activation: feed-forward activation ("gelu" is BERT's exact erf GELU).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        intermediate: int,
        dropout: float = 0.1,
        eps: float = 1e-12,
        norm_first: bool = False,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attn = MultiHeadAttention(dim, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, intermediate, activation)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) → (B, T, D); `mask` is a bool key mask broadcastable to (B, H, T, T)."""
        if self.norm_first:
            x = x + self.dropout(self.attn(self.norm1(x), mask=mask))
            return x + self.dropout(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.attn(x, mask=mask)))
        return self.norm2(x + self.dropout(self.ffn(x)))
