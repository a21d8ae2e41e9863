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
        model: the model being trained; its parameters are averaged from the first step they
            train (frozen ones never change; buffers such as BatchNorm statistics are averages already).
        decay: weight of the old average per update, in (0, 1): 0.999 averages over ~1000 steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        # parameter index → its average; a frozen parameter gets one when it first trains
        # (gradual unfreezing), until then it equals its own average
        self.average: dict[int, torch.Tensor] = {}
        self.updates = 0
        self._track_trainable()

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights (call after each optimizer step)."""
        self.updates += 1
        self._track_trainable()
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        index = list(self.average)
        torch._foreach_lerp_([self.average[i] for i in index], [self.params[i].detach() for i in index], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the model's weights with the average (for good: what training hands on)."""
        index = list(self.average)
        torch._foreach_copy_([self.params[i].detach() for i in index], [self.average[i] for i in index])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the model's weights inside the block; the trained weights back after it."""
        index = list(self.average)
        with torch.no_grad():
            trained = [self.params[i].detach().clone() for i in index]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([self.params[i].detach() for i in index], trained)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "average": {i: a.clone() for i, a in self.average.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        average = state["average"]
        if any(i >= len(self.params) or a.shape != self.params[i].shape for i, a in average.items()):
            raise CheckpointError(
                "the checkpoint's weight average does not match this model's parameters",
                "resume with the model and train.ema the run started with",
            )
        self.average = {i: a.to(self.params[i].device, self.params[i].dtype) for i, a in average.items()}
        self.decay, self.updates = float(state["decay"]), int(state["updates"])

    def _track_trainable(self) -> None:
        for i, p in enumerate(self.params):
            if p.requires_grad and i not in self.average:
                self.average[i] = p.detach().clone()
