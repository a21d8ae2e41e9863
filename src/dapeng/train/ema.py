"""An exponential moving average of a model's weights (Polyak averaging), as Keras' `use_ema`.

The average follows the trained weights after every optimizer step,

    average ← decay · average + (1 − decay) · weights,   decay = min(decay, (1 + n) / (10 + n))

(n: updates so far; the ramp lets the first steps count while the average holds little), and
is what gets evaluated, kept as the best checkpoint and saved: the mean of the last ~1/(1 − decay)
steps generalises better than the last point of a noisy descent. The Trainer builds one from
`train.ema`; in your own loop:

    average = WeightAverage(model, decay=0.999)
    for batch in loader:
        ...; optimizer.step(); average.update()
    with average.applied():
        evaluate(model)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dapeng.errors import CheckpointError


class WeightAverage:
    """Exponential moving average of `model`'s trainable parameters.

    Args:
        model: the model being trained; its parameters that require grad are averaged
            (frozen ones never change, buffers such as BatchNorm statistics are averages already).
        decay: weight of the old average per update, in (0, 1): 0.999 averages over ~1000 steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights (call after each optimizer step)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the model's weights with the average (for good: what training hands on)."""
        torch._foreach_copy_([p.detach() for p in self.params], self.average)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the model's weights inside the block; the trained weights back after it."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], trained)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "average": [a.clone() for a in self.average]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        average = state["average"]
        if len(average) != len(self.average) or any(a.shape != b.shape for a, b in zip(average, self.average)):
            raise CheckpointError(
                "the checkpoint's weight average does not match this model's trainable parameters",
                "resume with the model and train.ema the run started with",
            )
        with torch.no_grad():
            torch._foreach_copy_(self.average, [a.to(b.device) for a, b in zip(average, self.average)])
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
