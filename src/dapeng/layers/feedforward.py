"""Position-wise feed-forward blocks: GELU MLP (BERT) and SwiGLU (Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.layers.fused import project_together

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact erf form, as BERT
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class FeedForward(nn.Module):
    """`down(dropout(act(up(x))))`, the Transformer MLP.

    Args:
        dim: model width.
        hidden: inner width (BERT's "intermediate size").
        activation: "gelu" (exact erf), "gelu_tanh", "relu" or "silu".
        dropout: applied to the output (BERT's hidden dropout lives in the residual branch).
        bias: whether the projections have biases.
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        self.activation = activation
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(_ACTIVATIONS[self.activation](self.up(x))))


class SwiGLU(nn.Module):
    """Gated feed-forward of Llama (Shazeer 2020): `down(silu(gate(x)) * up(x))`.

    Args:
        dim: model width.
        hidden: inner width (Llama's "intermediate size").
        bias: whether the projections have biases (Llama: no).
        dropout: applied to the output.
    """

    def __init__(self, dim: int, hidden: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project_together(x, (self.gate, self.up))
        out = self.down(F.silu(gate) * up)
        return self.dropout(out) if self.dropout is not None else out
