"""Knowledge distillation (Hinton et al. 2015): a small student learns from a trained teacher's outputs.

The teacher is any classifier Artifact of the same labels — a run directory, an Artifact
folder or a hub name — with its own tokenizer and preprocessing: it reads the raw records,
not the student's tensors, so a fine-tuned MiniLM can teach a BiLSTM over GloVe words.
Its logits are computed once, on the clean training records, and travel with the student's
items; the student (augmented as configured) then minimises

    (1 - alpha) · CE(student, labels) + alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

(`loss: mse` uses the mean squared error between raw logits instead, as Tang et al. 2019
did for BiLSTM students of BERT). Evaluation uses the plain task loss, so `eval/loss`
stays comparable with an undistilled run. A transfer set (`transfer.copies`) adds
perturbed copies of the training texts that the teacher labels as well: the student sees
how the teacher's decision moves around each example, which the labels alone don't show.

In a config (`dapeng distill CONFIG --teacher RUN` sets the same from the command line):

    distill: {teacher: runs/rt-minilm, alpha: 0.5, temperature: 2.0, transfer: {copies: 4}}
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dapeng.errors import ConfigError

__all__ = ["DistillTask", "attach_teacher", "cached_logits", "distillation_loss", "teacher_logits", "transfer_set"]

TEACHER_KEY = "teacher_logits"


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0,
                      kind: str = "kl") -> torch.Tensor:
    """The soft-target loss between (N, K) student and teacher logits, averaged over rows.

    `kind="kl"`: T² · KL(softmax(teacher/T) ‖ softmax(student/T)) — the T² keeps its gradients
    on the scale of the hard-label loss as T changes (Hinton et al.). `kind="mse"`: mean
    squared error of the logits.
    """
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind != "kl":
        raise ValueError(f"unknown distillation loss {kind!r}; choose kl or mse")
    log_p = F.log_softmax(student / temperature, dim=-1)
    log_q = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


@torch.inference_mode()
def teacher_logits(model: nn.Module, task: Any, records: Sequence[dict[str, Any]], batch_size: int = 64,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The teacher's (N, K) fp32 logits for `records`, in their order (batched by length: less padding)."""
    items = task.encode(records)
    model = model.to(device).eval()
    order = sorted(range(len(items)), key=lambda i: _length(items[i]))
    out: torch.Tensor | None = None
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = task.collate([items[i] for i in rows])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = task.predict(model, batch)["logits"].float().cpu()
        if logits.dim() != 2:
            raise ConfigError(f"the teacher gives logits of shape {tuple(logits.shape)}, not (batch, labels)",
                              "distillation needs a teacher with one label per input (a classifier)")
        if out is None:
            out = torch.empty(len(items), logits.shape[1])
        out[rows] = logits
    return out if out is not None else torch.empty(0, 0)


def _length(item: dict[str, Any]) -> int:
    ids = item.get("input_ids")
    return int(ids.shape[0]) if isinstance(ids, torch.Tensor) else 0


class DistillTask:
    """A task that adds the teacher's soft targets to another task's training loss.

    Everything but `collate` and `loss` is the wrapped task's (its state, metrics and
    decoding are what the saved Artifact keeps: the student needs no teacher to run).

    Args:
        task: the student's task, set up.
        alpha: weight of the soft-target loss (1 - alpha on the labels).
        temperature: softmax temperature of the KL loss.
        kind: "kl" or "mse" (see `distillation_loss`).
    """

    def __init__(self, task: Any, alpha: float = 0.5, temperature: float = 2.0, kind: str = "kl") -> None:
        self.task, self.alpha, self.temperature, self.kind = task, alpha, temperature, kind

    def __getattr__(self, name: str) -> Any:
        if name == "task":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.task.collate(items)
        if items and all(TEACHER_KEY in it for it in items):
            batch[TEACHER_KEY] = torch.stack([it[TEACHER_KEY] for it in items])  # (B, K)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hard, outputs = self.task.loss(model, batch)
        teacher = batch.get(TEACHER_KEY)
        if teacher is None or not model.training:
            return hard, outputs
        soft = distillation_loss(outputs["logits"], teacher, self.temperature, self.kind)
        return (1.0 - self.alpha) * hard + self.alpha * soft, outputs


def attach_teacher(
    spec: Any, task: Any, train_records: Sequence[dict[str, Any]], train_items: list[dict[str, Any]],
    eval_records: Sequence[dict[str, Any]] = (), device: str = "cpu", eval_items: Sequence[dict[str, Any]] = (),
) -> tuple[DistillTask, list[dict[str, Any]], dict[str, Any]]:
    """Load the teacher `spec.teacher`, write its logits into `train_items`, wrap `task`.

    Returns the wrapped task, the training items (with `spec.transfer.copies` perturbed
    copies of each text appended, labelled by the teacher too) and facts for the run's
    metrics: the teacher's name and, when there are eval records, its eval accuracy (what
    the student is measured against).

    Raises:
        ConfigError: the teacher is missing, is no classifier, or knows other labels.
    """
    from dapeng.hub.artifact import load_artifact
    from dapeng.hub.init import resolve_init

    if not hasattr(task, "labels") or not getattr(task, "labels", None):
        raise ConfigError(f"config key distill: task {getattr(task, 'name', task)!r} has no label set to distill",
                          "distillation works for text-classification and image-classification")
    teacher = load_artifact(resolve_init(spec.teacher), precision="fp32")
    teacher_labels = [str(label) for label in getattr(teacher.task, "labels", [])]
    missing = [label for label in task.labels if label not in teacher_labels]
    if not teacher_labels or missing:
        shown = ", ".join(missing[:10]) or "(none: it is no classifier)"
        raise ConfigError(f"config key distill.teacher: the teacher {spec.teacher!r} does not know the labels {shown}",
                          "distil from a classifier trained on the same labels")
    columns = torch.tensor([teacher_labels.index(label) for label in task.labels])  # teacher column of each label

    def logits_of(records: Sequence[dict[str, Any]]) -> torch.Tensor:
        return cached_logits(teacher, records, spec.batch_size, device)[:, columns]

    logits = logits_of(train_records)
    for item, row in zip(train_items, logits):
        item[TEACHER_KEY] = row
    facts: dict[str, Any] = {"teacher": str(spec.teacher), "teacher_train_accuracy": _accuracy(logits, train_items)}
    items = list(train_items)
    transfer = spec.transfer
    if transfer.copies:
        extra = transfer_set(train_records, transfer.copies, transfer.drop, transfer.synonym, transfer.seed,
                             ngram=transfer.ngram)
        extra_items = task.encode(extra)
        n = len(train_records)  # one cache entry per copy: asking for more copies later reuses these
        extra_logits = torch.cat([logits_of(extra[start:start + n]) for start in range(0, len(extra), n)])
        for item, row in zip(extra_items, extra_logits):
            item[TEACHER_KEY] = row
        items += extra_items
        facts["transfer_records"] = len(extra_items)
        # how often the teacher still gives the original label after the perturbation
        facts["teacher_transfer_agreement"] = _accuracy(
            torch.stack([it[TEACHER_KEY] for it in extra_items]), extra_items)
    if eval_records:
        eval_logits = logits_of(eval_records)
        facts["teacher_eval_accuracy"] = _accuracy(eval_logits, eval_items or task.encode(eval_records))
    return DistillTask(task, spec.alpha, spec.temperature, spec.loss), items, facts


def transfer_set(records: Sequence[dict[str, Any]], copies: int, drop: float = 0.1, synonym: float = 0.1,
                 seed: int = 0, ngram: float = 0.0) -> list[dict[str, Any]]:
    """`copies` perturbed versions of each text record, for the teacher to label (Tang et al. 2019).

    Word drops, GloVe-neighbour synonyms and n-gram cuts (Tang et al.'s n-gram sampling: the
    teacher says what a phrase alone conveys): `dapeng.data.augment.perturbed_copies`. The
    teacher's soft predictions on these texts show the student how the decision moves around
    each training example, which plain labels cannot. Deterministic for a seed (so the
    teacher's logits are cached across runs).

    Raises:
        ConfigError: the records hold no text.
    """
    from dapeng.data.augment import perturbed_copies

    return perturbed_copies(records, copies, drop, synonym, seed, ngram, key="distill.transfer")


def cached_logits(teacher: Any, records: Sequence[dict[str, Any]], batch_size: int = 64,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """`teacher_logits` of an Artifact, kept under `$DAPENG_HOME/cache/distill` for the next run.

    The key is a digest of the teacher's weights, its task state and the records, so a
    retrained teacher or other data never reads stale logits; a damaged cache file is
    recomputed (and rewritten atomically).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from dapeng._files import atomic_path, dapeng_home

    digest = hashlib.sha256()
    for name in ("model.safetensors", "dapeng.json"):
        file = Path(teacher.path) / name
        if file.is_file():
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    for record in records:
        for key in sorted(record):
            value = record[key]
            digest.update(key.encode())
            digest.update(value.tobytes() if isinstance(value, np.ndarray) else repr(value).encode())
    path = dapeng_home() / "cache" / "distill" / f"{digest.hexdigest()[:32]}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["logits"]
        except (SafetensorError, KeyError, OSError):
            pass  # recompute below
    logits = teacher_logits(teacher.model, teacher.task, records, batch_size, device)
    with atomic_path(path) as tmp:
        save_file({"logits": logits.contiguous()}, str(tmp))
    return logits


def _accuracy(logits: torch.Tensor, items: Sequence[dict[str, Any]]) -> float | None:
    labels = [it["label"] for it in items if "label" in it]
    if len(labels) != len(items) or not items:
        return None
    return float((logits.argmax(-1) == torch.stack(labels)).float().mean())
