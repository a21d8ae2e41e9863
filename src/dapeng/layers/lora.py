"""LoRA (Hu et al. 2021) as a verb over a model: `apply_lora(model)`, later `merge_lora(model)`.

`apply_lora` swaps the chosen `nn.Linear` layers for `LoRALinear` wrappers that add a
trainable low-rank update `B @ A * alpha / rank` to the frozen weight, and freezes
everything else (except the modules named in `keep_trainable`, e.g. a fresh task head).
`merge_lora` folds the update into the weights and puts plain `nn.Linear` layers back,
so the merged model has exactly the original architecture and state-dict names: it saves,
exports and quantizes like any other model. No layer carries a LoRA mode flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LoRALinear", "apply_lora", "lora_parameters", "merge_lora", "trainable_fraction"]


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-`rank` update.

    `B` starts at zero, so the wrapped layer first computes exactly what the base did.

    Args:
        base: the layer to adapt (kept, frozen, as `self.base`).
        rank: rank of the update.
        alpha: scale numerator; the update is multiplied by `alpha / rank`.
        dropout: dropout on the update's input while training.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (so code that reads `layer.weight.dtype` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """The weight update (out, in) that merging adds."""
        return (self.lora_b @ self.lora_a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in) → (…, out): base output plus the scaled low-rank path."""
        update = (self.dropout(x) @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)  # (…, out)
        return self.base(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` computing what this layer computes (dropout aside)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                          device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.base.weight + self.delta().to(self.base.weight.dtype))
            if self.base.bias is not None:
                layer.bias.copy_(self.base.bias)
        return layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _matches(name: str, targets: Sequence[str]) -> bool:
    # A target is a module name ("q") or a dotted suffix ("attn.q"); "all-linear" takes every layer.
    return any(t == "all-linear" or name == t or name.endswith("." + t) for t in targets)


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = ("q", "v"),
    dropout: float = 0.0,
    keep_trainable: Sequence[str] = ("head",),
) -> nn.Module:
    """Wrap the `nn.Linear` layers named in `targets` with LoRA, in place; freeze the rest.

    Args:
        model: any model.
        rank: rank of each update.
        alpha: scale numerator (update × alpha / rank).
        targets: module names or dotted suffixes to adapt ("q", "v", "attn.o"), or "all-linear".
        dropout: dropout on the LoRA input while training.
        keep_trainable: top-level or dotted module names left trainable too (the new task head).

    Returns:
        The same model, for chaining.

    Raises:
        ValueError: no `nn.Linear` matched `targets`.
    """
    chosen = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and _matches(name, targets) and not _kept(name, keep_trainable)
    ]
    if not chosen:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no linear layer matches LoRA targets {list(targets)}; linear layer names: {linear}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), rank=rank, alpha=alpha, dropout=dropout))
    for name, module in model.named_modules():
        if name and _kept(name, keep_trainable) and not isinstance(module, LoRALinear):
            for p in module.parameters():
                p.requires_grad_(True)
    return model


def _kept(name: str, keep: Sequence[str]) -> bool:
    return any(name == k or name.startswith(k + ".") for k in keep)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and restore plain `nn.Linear` layers, in place.

    All parameters are left trainable, as in a freshly built model.

    Returns:
        The same model, now with the original architecture and state-dict names.
    """
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in wrapped:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, getattr(owner, child).merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A and B matrices of `model`."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters ÷ all parameters (LoRA matrices included in both)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)
