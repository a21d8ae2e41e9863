"""The contract between data, model and training loop.

The one path data takes (DESIGN.md):

    records ─► Task.setup / Task.encode ─► Task.collate ─► Model ─► Task.loss ─► Trainer

* A *record* is a plain dict straight from a reader or the dataset catalog, e.g.
  `{"text": "a fine film", "label": "fresh"}` or `{"image": uint8 array (H, W[, C]), "label": 3}`
  or `{"tokens": [...], "tags": [...]}`.
* `setup` learns what the task needs from the training records (label set, tokenizer,
  normalisation statistics) so that `model_kwargs` can tell the model builder the sizes
  that depend on the data (`num_labels`, `vocab_size`, `in_channels`, ...).
* `encode` turns records into *items* (dicts of tensors, cached once); `collate` pads a
  list of items into a *batch* (dict of tensors, padded per batch).
* `loss(model, batch)` runs the model and returns the scalar loss and its outputs; the
  Trainer never looks inside. `metric()` returns a fresh accumulator for evaluation.
* `state()` is everything needed to rebuild the task for inference (labels, tokenizer
  path, preprocessing); it goes into the Artifact's `dapeng.json` ("labels", "preprocess").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

Record = dict[str, Any]
Item = dict[str, Any]
Batch = dict[str, Any]


@runtime_checkable
class Metric(Protocol):
    """Accumulates predictions over an evaluation pass."""

    def update(self, outputs: dict[str, torch.Tensor], batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]:
        """Scalar metrics by name, e.g. {"accuracy": 0.93, "macro_f1": 0.92}."""
        ...


@runtime_checkable
class Task(Protocol):
    """What every task in `TASKS` provides. See the module docstring for the data path."""

    name: str

    def setup(self, train: Sequence[Record]) -> None: ...

    def model_kwargs(self) -> dict[str, Any]: ...

    def encode(self, records: Sequence[Record]) -> list[Item]: ...

    def collate(self, items: list[Item]) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def metric(self) -> Metric: ...

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[Any]: ...

    def state(self) -> dict[str, Any]: ...
