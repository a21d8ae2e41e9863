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
        self._frozen = list(range(len(self.params)))  # indices without an average yet
        self.updates = 0
        self._track_trainable()

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights (call after each optimizer step)."""
        self.updates += 1
        self._track_trainable()
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        weights, average = self._pairs()
        torch._foreach_lerp_(average, weights, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the model's weights with the average (for good: what training hands on)."""
        torch._foreach_copy_(*self._pairs())

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the model's weights inside the block; the trained weights back after it."""
        weights, _ = self._pairs()
        with torch.no_grad():
            trained = [w.clone() for w in weights]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(weights, trained)

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
        self._frozen = [i for i in range(len(self.params)) if i not in self.average]
        self.decay, self.updates = float(state["decay"]), int(state["updates"])

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The averaged parameters (detached) and their averages, in the same order."""
        return [self.params[i].detach() for i in self.average], list(self.average.values())

    def _track_trainable(self) -> None:
        if not self._frozen:
            return
        for i in [i for i in self._frozen if self.params[i].requires_grad]:
            self.average[i] = self.params[i].detach().clone()
        self._frozen = [i for i in self._frozen if i not in self.average]
