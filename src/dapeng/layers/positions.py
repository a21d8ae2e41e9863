"""Positional information: sinusoidal and learned absolute positions, rotary embeddings (RoPE)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position vectors of "Attention Is All You Need"; no parameters.

    Args:
        dim: vector size (even).
        max_positions: how many positions the table holds.
    """

    def __init__(self, dim: int, max_positions: int = 2048) -> None:
        super().__init__()
        position = torch.arange(max_positions, dtype=torch.float32)[:, None]  # (P, 1)
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (D/2,)
        table = torch.zeros(max_positions, dim)
        table[:, 0::2] = torch.sin(position * freq)
        table[:, 1::2] = torch.cos(position * freq[: dim // 2])
        # not persistent: rebuilt from the arguments, so it never bloats a checkpoint
        self.register_buffer("table", table, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """(…) long positions → (…, dim) vectors."""
        return self.table[positions]


class LearnedPositions(nn.Module):
    """A trained vector per absolute position (BERT, GPT-2); `weight` is (max_positions, dim).

    Args:
        max_positions: longest sequence the model accepts.
        dim: vector size.
    """

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, dim).normal_(std=0.02))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """(…) long positions → (…, dim) vectors."""
        return F.embedding(positions, self.weight)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) in the Llama / Hugging Face "rotate half" layout.

    Query and key vectors are rotated by position-dependent angles, so their dot product
    depends only on the distance between positions.

    Args:
        head_dim: size of each attention head (even).
        max_positions: how many positions the cos/sin tables hold.
        theta: base of the geometric frequency sequence (Llama 2: 10,000; SmolLM2: 100,000).
    """

    def __init__(self, head_dim: int, max_positions: int = 2048, theta: float = 10000.0) -> None:
        super().__init__()
        self.theta = theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (Dh/2,)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # (P, Dh/2)
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], dim=-1), persistent=False)  # (P, Dh)
        # the sign of rotate-half is folded into the table, so `apply_rotary` needs one roll, not slices + cat
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], dim=-1), persistent=False)  # (P, Dh)

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (T,) or (B, T) → cos, signed sin of shape (1, 1, T, Dh) or (B, 1, T, Dh), to broadcast over heads."""
        cos, sin = self.cos[positions], self.sin[positions]
        if dtype is not None:
            cos, sin = cos.to(dtype), sin.to(dtype)
        if positions.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, Dh) vectors by the angles whose tables `RotaryEmbedding` returns.

    Equal to Hugging Face's `x * cos + rotate_half(x) * sin`: `sin` carries rotate-half's sign
    (its first half negated), so the halves only need swapping, which one `roll` does.
    """
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin
