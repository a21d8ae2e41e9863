"""Optimizers, learning-rate schedules and regularizers, built from plain arguments.

* `param_groups` puts norms, biases and embeddings-free 1-D tensors in a group without
  weight decay (L2 on a LayerNorm gain only hurts).
* `build_optimizer` makes SGD (momentum, Nesterov), Adam or AdamW, using the fused
  (single-kernel) implementation where torch offers it for the device.
* `build_schedule` returns a `LambdaLR` for constant/step/cosine/linear with linear warm-up.
* `l1_penalty` is the explicit L1 term added to the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from dapeng.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "linear")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: biases, norm weights and other 1-D tensors."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            is_norm = isinstance(module, _NORMS) or "norm" in type(module).__name__.lower()
            if is_norm or name.endswith("bias") or param.ndim <= 1:
                names.add(full)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: decayed weights and (decay-free) biases/norms; frozen params skipped.

    Without weight decay there is one group (a fused optimizer launches one kernel per group).
    """
    if not weight_decay:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": 0.0}] if params else []
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def decayed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weights that regularizers act on (the same set weight decay acts on)."""
    skip = no_decay_names(model)
    return [p for n, p in model.named_parameters() if p.requires_grad and n not in skip]


def _fast_kwargs(params: list[dict]) -> dict:
    """`fused=True` when every parameter lives on a device with a fused kernel (CPU and CUDA do)."""
    devices = {p.device.type for g in params for p in g["params"]}
    dtypes = {p.dtype for g in params for p in g["params"]}
    if len({type(p) for g in params for p in g["params"]}) > 1:
        # plain and DTensor parameters (tensor parallel): no multi-tensor kernel takes both in one list
        return {"foreach": False}
    if devices <= {"cpu", "cuda"} and dtypes <= {torch.float32, torch.float16, torch.bfloat16, torch.float64}:
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    groups: Sequence[dict[str, Any]] | None = None,
) -> torch.optim.Optimizer:
    """An optimizer over `model`'s trainable parameters with decay-free biases and norms.

    Args:
        groups: explicit parameter groups (e.g. `dapeng.train.finetune.layerwise_lr_groups`) instead of
            the default decay / no-decay split; a group's own "lr" or "weight_decay" wins.

    Raises:
        ConfigError: an unknown optimizer name or Nesterov without momentum.
    """
    groups = [{**g, "params": list(g["params"])} for g in groups] if groups is not None else param_groups(model, weight_decay)
    fast = _fast_kwargs(groups)
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ConfigError("config key train.optimizer.nesterov: Nesterov needs momentum > 0", "set train.optimizer.momentum=0.9")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **fast)
    if name == "adam":
        # Adam's weight_decay is L2 added to the gradient (the classic coupled form).
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, **fast)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **fast)
    raise ConfigError(f"config key train.optimizer.name: {name!r} is not one of {', '.join(OPTIMIZERS)}")


def lr_factor(
    name: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    step_size: int = 1000,
    gamma: float = 0.1,
    min_lr_ratio: float = 0.0,
) -> Callable[[int], float]:
    """The multiplier of the base learning rate at optimizer step `s` (0-based).

    Warm-up rises linearly from 1/(warmup+1) to 1 over `warmup_steps`; afterwards `constant`
    stays at 1, `step` multiplies by `gamma` every `step_size` steps, `cosine` and `linear`
    decay to `min_lr_ratio` at `total_steps`.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"config key train.schedule.name: {name!r} is not one of {', '.join(SCHEDULES)}")
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        done = min(1.0, (step - warmup_steps) / decay_steps)
        if name == "constant":
            return 1.0
        if name == "step":
            return gamma ** ((step - warmup_steps) // step_size)
        if name == "cosine":
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - done)

    return factor


def build_schedule(optimizer: torch.optim.Optimizer, name: str = "constant", **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `lr_factor(name, **kwargs)`; step it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(name, **kwargs))


def l1_penalty(params: Iterable[torch.Tensor], strength: float) -> torch.Tensor:
    """`strength · Σ|w|` over `params`, to add to the loss (its gradient is strength·sign(w))."""
    params = list(params)
    return strength * torch.stack([p.abs().sum() for p in params]).sum()
