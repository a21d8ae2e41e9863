"""Pooling a sequence of vectors into one, respecting padding."""

from __future__ import annotations

import torch

POOLINGS = ("cls", "mean", "max", "last", "none")


def pool_sequence(x: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Pool (B, T, D) token vectors to (B, D); padding (mask False) never contributes.

    A masked mean is summed in fp32 and rounded to x's dtype once: summed in bf16, partial
    sums are rounded, and how the reduction splits T, hence the result, depends on how much
    padding follows, i.e. on the batch.

    Args:
        x: token vectors.
        mask: (B, T) bool, True for real tokens; None when nothing is padded.
        mode: "cls" (first token), "mean", "max", "last" (last real token) or "none" (x unchanged).
    """
    if mode == "none":
        return x
    if mode == "cls":
        return x[:, 0]
    if mask is None:
        if mode == "mean":
            return x.mean(dim=1)
        if mode == "max":
            return x.amax(dim=1)
        return x[:, -1]
    if mode == "mean":
        weights = mask.float().unsqueeze(-1)  # (B, T, 1)
        return ((x.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)).to(x.dtype)
    if mode == "max":
        return x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min).amax(dim=1)
    if mode == "last":
        last = (mask.long().sum(dim=1) - 1).clamp_min(0)  # (B,)
        return x[torch.arange(x.shape[0], device=x.device), last]
    raise ValueError(f"unknown pooling {mode!r}; choose one of {', '.join(POOLINGS)}")
