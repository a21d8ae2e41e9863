"""Is an explanation faithful? Deletion curves (Petsiuk et al., 2018; Samek et al., 2017).

Delete the input's features (pixels, words) in the order an explanation ranks them, most
important first, replacing them with the baseline, and follow the probability of the
explained label. A faithful explanation makes it fall fast: the area under the curve is
small. The same curve for a random order is the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def deletion_curve(
    score: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    baseline: torch.Tensor,
    feature_mask: torch.Tensor,
    order: np.ndarray,
    steps: int = 20,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, float]:
    """The deletion curve of one input.

    Args:
        score: batch of inputs (N, ...) -> the explained label's probability (N,).
        inputs: (1, ...) the input as the model takes it.
        baseline: (1, ...) what a deleted feature becomes (the IG baseline).
        feature_mask: broadcastable to `inputs`, the feature id of each element (-1: never
            deleted, e.g. [CLS]); like Captum's `feature_mask`.
        order: feature ids, most important first (every feature once).
        steps: points on the curve after the first (at most one per feature).

    Returns:
        (fractions deleted, probabilities, area under the curve over [0, 1]).
    """
    n = len(order)
    counts = np.unique(np.round(np.linspace(0, n, min(steps, n) + 1)).astype(int))
    rank = torch.full((int(feature_mask.max()) + 2,), n, dtype=torch.long, device=inputs.device)
    rank[torch.as_tensor(order, dtype=torch.long, device=inputs.device)] = torch.arange(n, device=inputs.device)
    feature_rank = torch.where(feature_mask >= 0, rank[feature_mask.clamp_min(0)], n)  # rank of each element
    probs = []
    with torch.no_grad():
        for start in range(0, len(counts), batch_size):
            ks = torch.as_tensor(counts[start : start + batch_size], device=inputs.device)
            deleted = feature_rank.unsqueeze(0) < ks.view(-1, *([1] * feature_rank.dim()))  # (k, 1, ...)
            batch = torch.where(deleted.squeeze(1), baseline, inputs)  # (k, ...)
            probs.append(score(batch).float().cpu())
    fractions = counts / max(n, 1)
    curve = torch.cat(probs).numpy()
    return fractions, curve, float(np.trapezoid(curve, fractions))


def order_by(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """Feature ids by decreasing score (most evidence for the label first).

    Ties (e.g. the zeros of a ReLU'd Grad-CAM map) are broken at random, not by position:
    a raster order would delete the image's top rows first and favour no method fairly.
    """
    flat = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.lexsort((np.random.default_rng(seed).random(flat.size), -flat))


def completeness_rate(checks: list[dict[str, float]], tolerance: float = 0.05) -> float:
    """The share of inputs whose IG attributions sum to f(x) - f(baseline) within `tolerance`."""
    if not checks:
        return float("nan")
    return float(np.mean([c["relative_error"] <= tolerance for c in checks]))


def deletion_auc(
    pipeline: Any, raw: Any, label_index: int, order: np.ndarray | None = None, scores: np.ndarray | None = None,
    steps: int = 20,
) -> float:
    """Area under the deletion curve of one input of `pipeline`, deleting in `order`.

    Words are deleted by putting padding in place of their tokens, pixels by putting the
    black image's value: the baselines `explain` uses for Integrated Gradients. Pixels that
    are black already are left out of the order (and of the x axis).

    Args:
        pipeline: as for `explain`.
        raw: one input, as for `explain`.
        label_index: the label whose probability is followed.
        order: feature ids (word or pixel indices), most important first; or
        scores: an explanation's word (W,) or pixel (H, W) scores, ranked with `order_by`.
    """
    from dapeng.explain.core import _batch, _device, _pad_id, _records
    from dapeng.explain.words import align_words

    model, task = pipeline.model, pipeline.task
    [(record, _)] = _records(pipeline, raw)
    batch = _batch(task, record, _device(model))
    if "input_ids" in batch:
        ids, mask = batch["input_ids"][:1], batch.get("attention_mask")
        text = record.get("text")
        alignment = align_words(task, text, ids[0].tolist(), batch.get("word_ids"))
        feature_mask = torch.tensor([[-1 if w is None else w for w in alignment.word_of_token]], device=ids.device)
        baseline = torch.where(feature_mask >= 0, torch.full_like(ids, _pad_id(task, alignment)), ids)

        def score(b: torch.Tensor) -> torch.Tensor:
            out = model(b) if mask is None else model(b, mask[:1].expand(len(b), -1))
            return out.float().softmax(-1)[:, label_index]

        inputs = ids
    else:
        inputs = batch["images"][:1].float()
        black = {**record, "image": np.zeros_like(np.asarray(record["image"]))}
        baseline = _batch(task, black, inputs.device)["images"][:1].float()
        height, width = inputs.shape[-2:]
        # A pixel already at the baseline (the black background) is not a feature: deleting
        # it changes nothing, so it would only pad every curve out. Only the others count.
        live = (inputs != baseline).any(1, keepdim=True)  # (1, 1, H, W)
        pixel_ids = torch.arange(height * width, device=inputs.device).view(1, 1, height, width)
        feature_mask = torch.where(live, pixel_ids, -1)

        def score(b: torch.Tensor) -> torch.Tensor:
            return model(b).float().softmax(-1)[:, label_index]

    if order is None:
        order = order_by(scores)
    present = set(feature_mask[feature_mask >= 0].tolist())
    order = np.asarray([i for i in order if int(i) in present], dtype=np.int64)
    return deletion_curve(score, inputs, baseline, feature_mask, order, steps)[2]
