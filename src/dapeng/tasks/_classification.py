"""What text and image classification share: label maps, options, the loss, metrics and decoding.

`ClassificationTask` holds the common half; `TextClassificationTask` and
`ImageClassificationTask` add how records become tensors (one level of subclassing).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from dapeng.errors import ConfigError, DataError
from dapeng.records import Record


class Options(BaseModel):
    """Task options common to every classifier (the `task_options:` section of a config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: None | str | list[float] | dict[str, float] = Field(
        None, description='"balanced", a list in label order, or {label: weight}'
    )


def parse_options(cls: type[BaseModel], task: str, options: dict[str, Any]) -> Any:
    """Validate `task_options`; unknown keys and bad values become a ConfigError naming the key."""
    try:
        return cls(**options)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        allowed = ", ".join(cls.model_fields)
        hint = f"{task} options: {allowed}" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"config key task_options.{key}: {first['msg'].lower()}", hint) from None


def _natural(label: str) -> tuple:
    # "2" < "10", and numbers before words
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", label) if p)


def label_list(records: Sequence[Record]) -> list[str]:
    """The sorted distinct labels of training records (naturally ordered: "2" before "10")."""
    labels: set[str] = set()
    for i, r in enumerate(records):
        if "label" not in r or r["label"] is None:
            raise DataError(
                f"{where(r, i)}: training record has no label", "every training record needs a 'label'"
            )
        labels.add(str(r["label"]))
    if len(labels) < 2:
        raise DataError(
            f"training data has {len(labels)} distinct label(s)", "classification needs at least two classes"
        )
    return sorted(labels, key=_natural)


def where(record: Record, index: int) -> str:
    """Where a record came from ("file:line"), else its position."""
    return str(record.get("_source") or f"record {index}")


class ClassificationMetric:
    """Accumulates predictions: accuracy, macro-F1, a per-class report and the confusion matrix."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self.matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)  # rows: true, columns: predicted

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        pred = outputs["logits"].detach().argmax(-1).cpu().numpy()
        true = batch["labels"].cpu().numpy()
        np.add.at(self.matrix, (true, pred), 1)

    def per_class(self) -> dict[str, dict[str, float]]:
        tp = np.diag(self.matrix).astype(np.float64)
        support = self.matrix.sum(1)
        predicted = self.matrix.sum(0)
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
        return {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(self.labels)
        }

    def compute(self) -> dict[str, float]:
        total = self.matrix.sum()
        if total == 0:
            return {"accuracy": 0.0, "macro_f1": 0.0}
        report = self.per_class()
        present = [r["f1"] for r in report.values() if r["support"] > 0]
        return {"accuracy": float(np.trace(self.matrix) / total), "macro_f1": float(np.mean(present))}

    def write_report(self, directory: str | Path, prefix: str = "") -> list[Path]:
        """Write `{prefix}classification_report.json` and `{prefix}confusion_matrix.png` into `directory`."""
        from dapeng._files import atomic_path

        directory = Path(directory)
        report = {
            "metrics": self.compute(),
            "per_class": self.per_class(),
            "labels": self.labels,
            "confusion_matrix": self.matrix.tolist(),
        }
        json_path = directory / f"{prefix}classification_report.json"
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        png_path = directory / f"{prefix}confusion_matrix.png"
        with atomic_path(png_path) as tmp:
            plot_confusion(self.matrix, self.labels, tmp)
        return [json_path, png_path]


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], path: Path) -> None:
    """A row-normalised confusion matrix with counts, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(4.0, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set_title(f"confusion matrix (accuracy {np.trace(matrix) / max(matrix.sum(), 1):.2%})")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


class ClassificationTask:
    """The shared half of a classifier. Subclasses set `name`, `capabilities` and implement
    `setup`, `model_kwargs`, `encode`, `collate`, `forward`, `state` and `from_state`."""

    name = "classification"

    def __init__(self, options: Options) -> None:
        self.options = options
        self.labels: list[str] = []
        self.index: dict[str, int] = {}
        self.class_weights: list[float] | None = None

    # -- labels ---------------------------------------------------------------------------

    def set_labels(self, labels: Sequence[str], train: Sequence[Record] | None = None) -> None:
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.class_weights = self._weights(train)

    def _weights(self, train: Sequence[Record] | None) -> list[float] | None:
        spec = self.options.class_weights
        if spec is None:
            return None
        if spec == "balanced":
            if train is None:
                return None
            counts = Counter(str(r["label"]) for r in train)
            total = sum(counts.values())
            return [total / (len(self.labels) * counts[label]) for label in self.labels]
        if isinstance(spec, str):
            raise ConfigError(
                f"config key task_options.class_weights: unknown value {spec!r}",
                'use "balanced", a list in label order, or {label: weight}',
            )
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - set(self.labels))
            if unknown:
                raise ConfigError(
                    f"config key task_options.class_weights: unknown label(s) {', '.join(unknown)}",
                    f"labels: {', '.join(self.labels)}",
                )
            return [float(spec.get(label, 1.0)) for label in self.labels]
        if len(spec) != len(self.labels):
            raise ConfigError(
                f"config key task_options.class_weights: {len(spec)} weights for {len(self.labels)} labels",
                f"labels in order: {', '.join(self.labels)}",
            )
        return [float(w) for w in spec]

    def label_id(self, record: Record, i: int) -> int | None:
        """The class index of a record's label; None when it has none (inputs to predict)."""
        label = record.get("label")
        if label is None:
            return None
        try:
            return self.index[str(label)]
        except KeyError:
            shown = ", ".join(self.labels[:20]) + (" …" if len(self.labels) > 20 else "")
            raise DataError(
                f"{where(record, i)}: unknown label {str(label)!r}", f"labels seen in training: {shown}"
            ) from None

    # -- the model side -------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The outputs for a batch with or without labels (what the Trainer's `predict` calls)."""
        return self.forward(model, batch)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy (with the configured label smoothing and class weights) and {"logits"}."""
        outputs = self.forward(model, batch)
        logits = outputs["logits"]
        weight = torch.tensor(self.class_weights, device=logits.device) if self.class_weights else None
        loss = F.cross_entropy(
            logits.float(), batch["labels"], weight=weight, label_smoothing=self.options.label_smoothing
        )
        return loss, outputs

    def metric(self) -> ClassificationMetric:
        return ClassificationMetric(self.labels)

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """One `{"label", "score", "probabilities": {label: p}}` per row of logits."""
        probs = outputs["logits"].detach().float().softmax(-1).cpu().numpy()
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append(
                {
                    "label": self.labels[best],
                    "score": float(row[best]),
                    "probabilities": {label: float(p) for label, p in zip(self.labels, row)},
                }
            )
        return results

    def base_state(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "class_weights": self.class_weights,
            "options": self.options.model_dump(mode="json"),
        }

    def restore_labels(self, state: dict[str, Any]) -> None:
        labels = state.get("labels")
        if not labels:
            raise DataError(
                f"{self.name} state has no labels", "the Artifact's dapeng.json must list its labels"
            )
        self.labels = [str(label) for label in labels]
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.class_weights = state.get("class_weights")
