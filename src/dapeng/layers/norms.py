"""Normalisation layers: LayerNorm (BERT, pre-LN encoders) and RMSNorm (Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# torch's LayerNorm already is the reference (fused kernel, `eps`, affine weight and bias).
LayerNorm = nn.LayerNorm


class _RMSNormFunction(torch.autograd.Function):
    """fp32 RMSNorm with a hand-written backward.

    On CPU `F.rms_norm` is a composite of pow/mean/rsqrt/mul whose autograd graph makes about
    ten passes over the activations in backward; this one makes five: `dx = r·(g·w − x̂·mean(g·w·x̂))`
    and `dw = Σ g·x̂` from the saved normalised input x̂ and the per-row 1/rms r.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        rstd = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1).div_(x.shape[-1]).add_(eps))  # (…, 1)
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        xhat, rstd, weight = ctx.saved_tensors
        dweight = (grad * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, dweight, None
        gw = grad * weight
        dot = torch.linalg.vecdot(gw, xhat).unsqueeze(-1).div_(xhat.shape[-1])  # (…, 1)
        return gw.sub_(xhat * dot).mul_(rstd), dweight, None


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), as in Llama: `x / rms(x) * weight`.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            x.dtype == weight.dtype == torch.float32
            and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad)
            and not torch.compiler.is_compiling()
        ):
            return _RMSNormFunction.apply(x, weight, self.eps)
        if weight.dtype == torch.bfloat16 and x.dtype == torch.float32:
            weight = weight.float()  # fp32 activations over bf16 weights (weight-only bf16 decoding)
        # one kernel that accumulates in fp32 even for bf16 inputs
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
