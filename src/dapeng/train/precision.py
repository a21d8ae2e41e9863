"""Device, precision, seeding and determinism: the pieces a loop needs before its first step.

Usable on their own from a hand-written loop:

    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    with autocast(precision, device):
        loss = ...
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from dapeng._hardware import native_bf16
from dapeng.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → CUDA when present, else the CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key train.device: 'cuda' but no CUDA device is available", "use auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"config key train.device: {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively (fast) on `device` (`dapeng._hardware.native_bf16`)."""
    return native_bf16(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` → `bf16` where the hardware runs it natively, else `fp32`; explicit choices pass."""
    if precision not in PRECISIONS:
        raise ConfigError(f"config key train.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The mixed-precision context for forward passes: bf16 autocast, or nothing for fp32.

    bf16 keeps fp32's exponent range, so no gradient scaler is needed (unlike fp16).
    """
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Ask torch for deterministic kernels (and cuBLAS for a fixed workspace) when `enabled`."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Only when it changes: the call imports torch._inductor (seconds) even to switch off.
    if torch.are_deterministic_algorithms_enabled() != enabled:
        torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Switch `model` to eval mode without gradients, restoring its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`torch.compile(model)` when `enabled`; the caller keeps the original for state dicts."""
    return torch.compile(model) if enabled else model
