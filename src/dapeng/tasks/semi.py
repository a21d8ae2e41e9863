"""Semi-supervised learning: a classifier also learns from the unlabeled pool of a few-label split.

A Task wrapper (as distillation is): the Trainer's batches stay the labelled items; `collate`
adds `ratio` (μ) × B items drawn at random from the unlabeled pool (with replacement, from
torch's global generator, which the Trainer seeds and saves in its checkpoints), in two views; `loss` adds `weight` (λ_u) × the unlabeled loss to the wrapped task's own loss

    ℓ_u = 1/(μB) · Σ_b 1[max p(y | weak_b) ≥ τ] · CE(argmax p(y | weak_b), logits(strong_b))

* `method: fixmatch` (Sohn et al. 2020): the weak view's confident prediction (no gradient) is
  the strong view's target. Images: weak = flip + crop, strong = weak + RandAugment + Cutout
  (`dapeng.data.augment`); texts: weak = the text itself, strong = one of a few perturbed
  copies (word drops and GloVe synonyms, `dapeng.data.augment.perturbed_copies`), made once.
* `method: pseudo_label` (Lee 2013): one view, the weak one; its own confident prediction,
  detached, is its target.

The views are chosen by the task's declared input (`capabilities.input`), and run through
the model as its plain inputs (`dapeng.models.forward_inputs`): the wrapped task's own
training augmentation applies to the labelled items only (FixMatch augments those weakly:
give the task that augmentation). Evaluation, the saved Artifact and inference are the
wrapped task's: the unlabeled pool is needed for training only.

In a config, with the pool a few-label split leaves:

    data: {dataset: fashion-mnist, labels_per_class: 100}
    semi: {method: fixmatch, threshold: 0.95, ratio: 7, weight: 1.0}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.data.augment import ImageAugment, cutout, perturbed_copies, rand_augment
from dapeng.errors import ConfigError
from dapeng.models import forward_inputs
from dapeng.tasks.base import capabilities_of

__all__ = ["ImageViews", "SemiSupervisedTask", "TextViews", "attach_semi", "confident_targets", "unlabeled_loss"]

LABELLED_KEY = "semi_labelled"  # marks the training items, whose batches draw unlabeled ones
WEAK, STRONG = "unlabeled_weak", "unlabeled_strong"


def confident_targets(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N,) predicted classes of (N, K) logits and the (N,) mask of those with probability ≥ `threshold`."""
    confidence, targets = logits.detach().float().softmax(-1).max(-1)
    return targets, confidence >= threshold


def unlabeled_loss(target_logits: torch.Tensor, logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ_u (module docstring): the masked cross-entropy of `logits` against the confident
    predictions of `target_logits` (no gradient through them), averaged over all N rows.

    Returns:
        the loss and the (N,) mask of the rows that count.
    """
    targets, mask = confident_targets(target_logits, threshold)
    per_item = F.cross_entropy(logits.float(), targets, reduction="none")
    return (per_item * mask).mean(), mask


class ImageViews:
    """Weak (flip + crop) and strong (weak, RandAugment, Cutout) views of uint8-valued image items.

    Args:
        pool: the unlabeled items, `{"image": (C, S, S)}`.
        hflip: random left-right flips.
        crop_padding: padding of the random crop.
        ops: RandAugment operations per strong view.
        cutout: side of the Cutout square as a fraction (0: none).
    """

    def __init__(self, pool: Sequence[dict[str, Any]], hflip: bool = True, crop_padding: int = 2, ops: int = 2,
                 cutout: float = 0.5) -> None:
        self.pool = pool
        self.weak_augment = ImageAugment(crop_padding=crop_padding, hflip=hflip)
        self.ops, self.cutout = ops, cutout

    def __len__(self) -> int:
        return len(self.pool)

    def views(self, rows: Sequence[int], with_strong: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The weak view of each pool item in `rows`, and its strong view when asked."""
        pixels = torch.stack([self.pool[i]["image"] for i in rows]).float().div_(255)  # (N, C, S, S) in [0, 1]
        weak = _image_items(self.weak_augment(pixels))
        if not with_strong:
            return weak, None
        strong = rand_augment(self.weak_augment(pixels), self.ops)
        if self.cutout:
            strong = cutout(strong, self.cutout, fill=0.5)
        return weak, _image_items(strong)


def _image_items(pixels: torch.Tensor) -> list[dict[str, Any]]:
    return [{"image": x} for x in pixels * 255]  # float (C, S, S) on the 0..255 scale the task's collate reads


class TextViews:
    """The unlabeled texts as they are (weak) and `copies` perturbed versions of each (strong).

    Args:
        pool: the unlabeled items.
        copies: for each copy, the encoded perturbed version of every pool item, in pool order.
    """

    def __init__(self, pool: Sequence[dict[str, Any]], copies: Sequence[Sequence[dict[str, Any]]]) -> None:
        self.pool, self.copies = pool, copies

    def __len__(self) -> int:
        return len(self.pool)

    def views(self, rows: Sequence[int], with_strong: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """Each pool item in `rows` as it is, and a random one of its perturbed copies when asked."""
        weak = [self.pool[i] for i in rows]
        if not with_strong:
            return weak, None
        if not self.copies:
            raise ConfigError("config key semi.text.copies: fixmatch on texts needs perturbed copies",
                              "set semi.text.copies to 1 or more")
        pick = torch.randint(0, len(self.copies), (len(rows),)).tolist()
        return weak, [self.copies[c][i] for c, i in zip(pick, rows)]


class SemiSupervisedTask:
    """A classification task that adds the unlabeled loss to its training loss (module docstring).

    Everything but `collate` and `loss` is the wrapped task's.

    Args:
        task: the classification task, set up.
        views: `ImageViews` or `TextViews` over the unlabeled pool.
        method: "fixmatch" or "pseudo_label".
        threshold: confidence τ a prediction needs to become a target.
        weight: λ_u, the weight of the unlabeled loss.
        ratio: μ, unlabeled items drawn per labelled item of a batch.
    """

    def __init__(self, task: Any, views: ImageViews | TextViews, method: str = "fixmatch", threshold: float = 0.95,
                 weight: float = 1.0, ratio: int = 7) -> None:
        if method not in ("fixmatch", "pseudo_label"):
            raise ConfigError(f"config key semi.method: {method!r} is not one of fixmatch, pseudo_label")
        self.task, self.views, self.method = task, views, method
        self.threshold, self.weight, self.ratio = threshold, weight, ratio
        self._confident: list[torch.Tensor] = []  # per step, the fraction of drawn items that counted (on the device)

    def __getattr__(self, name: str) -> Any:
        if name == "task":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The wrapped task's batch; a training batch of B items gets μ·B unlabeled ones, in views."""
        batch = self.task.collate(items)
        if items and len(self.views) and all(LABELLED_KEY in it for it in items):
            rows = torch.randint(0, len(self.views), (self.ratio * len(items),)).tolist()
            weak, strong = self.views.views(rows, with_strong=self.method == "fixmatch")
            batch[WEAK] = self.task.collate(weak)
            if strong is not None:
                batch[STRONG] = self.task.collate(strong)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labelled, outputs = self.task.loss(model, batch)
        if WEAK not in batch or not model.training:
            return labelled, outputs
        if self.method == "fixmatch":
            with torch.no_grad():
                target_logits = model(**forward_inputs(model, batch[WEAK]))
            logits = model(**forward_inputs(model, batch[STRONG]))
        else:
            logits = target_logits = model(**forward_inputs(model, batch[WEAK]))
        unlabeled, mask = unlabeled_loss(target_logits, logits, self.threshold)
        self._confident.append(mask.float().mean())
        return labelled + self.weight * unlabeled, outputs

    def fit_facts(self) -> dict[str, Any]:
        """For the run's metrics: the fraction of drawn unlabeled items confident enough to count,
        over all training steps and in the last tenth of them (in this process: a resume starts afresh)."""
        if not self._confident:
            return {}
        rates = torch.stack(self._confident).cpu()
        tail = rates[-max(1, len(rates) // 10):]
        return {"unlabeled_confident_fraction": float(rates.mean()), "unlabeled_confident_fraction_end": float(tail.mean())}


def attach_semi(spec: Any, task: Any, train_items: list[dict[str, Any]], pool: Sequence[dict[str, Any]],
                world_size: int = 1) -> tuple[SemiSupervisedTask, dict[str, Any]]:
    """Wrap `task` to learn from the unlabeled `pool` records as the `semi:` section `spec` says.

    Marks `train_items` as the labelled ones (their batches draw the unlabeled items), encodes
    the pool and, for FixMatch on texts, its perturbed copies.

    Returns:
        the wrapped task and facts for the run's metrics.

    Raises:
        ConfigError: no unlabeled pool, a task that is no classifier, or many processes.
    """
    if not pool:
        raise ConfigError("config key semi: there is no unlabeled pool to learn from",
                          "set data.labels_per_class or data.labelled_fraction")
    caps = capabilities_of(task)
    if caps.output != "label" or caps.input not in ("image", "text"):
        raise ConfigError(f"config key semi: task {task.name!r} is no text or image classifier",
                          "semi-supervised learning wraps text-classification and image-classification")
    if world_size > 1:
        raise ConfigError("config key semi: runs on one process (its unlabeled forward passes are extra to DDP's)",
                          "train without torchrun")
    items = task.encode(pool)
    views: ImageViews | TextViews
    if caps.input == "image":
        image = spec.image
        views = ImageViews(items, image.hflip, image.crop_padding, image.ops, image.cutout)
    else:
        text = spec.text
        copies = []
        if spec.method == "fixmatch":
            perturbed = task.encode(perturbed_copies(pool, text.copies, text.drop, text.synonym, text.seed,
                                                     text.ngram, key="semi.text"))
            copies = [perturbed[start:start + len(pool)] for start in range(0, len(perturbed), len(pool))]
        views = TextViews(items, copies)
    for item in train_items:
        item[LABELLED_KEY] = True
    facts = {"semi_method": spec.method}
    return SemiSupervisedTask(task, views, spec.method, spec.threshold, spec.weight, spec.ratio), facts
