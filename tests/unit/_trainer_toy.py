"""A tiny synthetic classification Task and model for the Trainer's tests (no data sets needed)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dapeng.tasks.base import LABEL_OUTPUT, Capabilities


def make_records(n: int = 96, dim: int = 8, classes: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Points around `classes` random centres: separable enough to learn in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 3
    labels = torch.randint(0, classes, (n,), generator=gen)
    points = centres[labels] + torch.randn(n, dim, generator=gen)
    return [{"x": points[i].tolist(), "label": f"c{int(labels[i])}"} for i in range(n)]


class ToyMetric:
    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        self.correct += int((outputs["logits"].argmax(-1) == batch["labels"]).sum())
        self.total += len(batch["labels"])

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.correct / max(1, self.total)}


class ToyTask:
    name = "toy-classification"
    capabilities = Capabilities(input="text", output="label", verbs=frozenset({"predict"}), output_schema=LABEL_OUTPUT)

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.labels: list[str] = []
        self.dim = 0

    def setup(self, train: list[dict[str, Any]]) -> None:
        self.labels = sorted({r["label"] for r in train})
        self.dim = len(train[0]["x"])

    def model_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.dim, "num_labels": len(self.labels)}

    def encode(self, records: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        index = {label: i for i, label in enumerate(self.labels)}
        return [
            {"x": torch.tensor(r["x"]) * self.scale, "labels": torch.tensor(index.get(r.get("label"), -100))}
            for r in records
        ]

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([i["x"] for i in items]), "labels": torch.stack([i["labels"] for i in items])}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["x"])
        return nn.functional.cross_entropy(logits.float(), batch["labels"]), {"logits": logits}

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": model(batch["x"])}

    def metric(self) -> ToyMetric:
        return ToyMetric()

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[str]:
        return [self.labels[i] for i in outputs["logits"].argmax(-1).tolist()]

    def state(self) -> dict[str, Any]:
        return {"labels": self.labels, "dim": self.dim, "scale": self.scale}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ToyTask:
        task = cls(scale=state["scale"])
        task.labels, task.dim = list(state["labels"]), state["dim"]
        return task


class ToyNet(nn.Module):
    """Linear → ReLU → Dropout → LayerNorm → Linear: dropout exercises the RNG, the norm the no-decay group."""

    def __init__(self, in_features: int = 8, num_labels: int = 3, hidden: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.LayerNorm(hidden))
        self.head = nn.Linear(hidden, num_labels)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def reset_head(self, num_labels: int) -> None:
        self.head = nn.Linear(self.head.in_features, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def register() -> None:
    """Register the toy task and model (idempotent) so the runner and CLI can build them by name."""
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    TASKS.register("toy-classification", ToyTask)
    MODELS.register("toy-mlp", ToyNet)


def toy_splits(cfg: Any = None) -> Any:
    """160 toy records as the runner's train/eval/test splits (stands in for `dapeng.data.load_splits`)."""
    from dapeng.data.splits import Splits

    records = make_records(160)
    return Splits(records[:112], records[112:136], records[136:])
