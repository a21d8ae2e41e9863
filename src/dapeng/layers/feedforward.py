"""Position-wise feed-forward blocks: GELU MLP (BERT) and SwiGLU (Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.layers.fused import linear, project_fused

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
        return self.dropout(linear(_ACTIVATIONS[self.activation](linear(x, self.up)), self.down))


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
        gate_up = project_fused(x, (self.gate, self.up))  # (…, 2H): one GEMM for both, or None
        if gate_up is None:
            hidden = F.silu(linear(x, self.gate)) * linear(x, self.up)
        elif gate_up.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            hidden = _SiluMul.apply(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        out = linear(hidden, self.down)
        return self.dropout(out) if self.dropout is not None else out


class _SiluMul(torch.autograd.Function):
    """`silu(gate) * up` from the fused (…, 2H) gate|up projection, for training.

    Its backward writes d(gate) and d(up) straight into one (…, 2H) buffer (the fused GEMM's
    output gradient); autograd's chunk → silu → mul graph would make them separately, then
    concatenate them.
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        gate, up = gate_up.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate_up, activated)
        return activated * up  # (…, H)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        gate_up, activated = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.mul(grad, activated, out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return out
