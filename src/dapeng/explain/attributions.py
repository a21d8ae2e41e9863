"""Attribution algorithms over a model and one encoded input, through Captum.

Text: Integrated Gradients and saliency on the output of the embedding layer
(`model.get_input_embeddings()`), one score per token. Images: Integrated Gradients and
saliency on the pixels, Grad-CAM on `model.cam_layer`, one score per pixel.

Integrated Gradients explains the target's *probability*, so its attributions add up to
p(x) - p(baseline) (completeness) and read as shares of the prediction. Saliency and
Grad-CAM differentiate the target's *logit*, as their papers do: the gradient of a
saturated softmax vanishes and says nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dapeng.explain.batching import internal_batch_size, saved_activation_bytes

Target = int | tuple[int, int]
# IG's Riemann sum is refined (steps doubled) until the sum of attributions matches
# f(x) - f(baseline) within this relative error, up to `max_steps`.
COMPLETENESS_TOLERANCE = 0.05
# Below this output difference a relative error is meaningless: the baseline already
# scores as the input does, and the attributions are all near zero.
MIN_OUTPUT_DIFFERENCE = 1e-3


@dataclass
class Attribution:
    """Scores for each explained target: (N, T) for text tokens, (N, H, W) for pixels."""

    scores: np.ndarray
    internal_batch_size: int | None = None
    completeness: list[dict[str, float]] | None = None


def probabilities(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The model's forward with a softmax over the last (label) dimension."""

    def forward(*args: Any) -> torch.Tensor:
        return model(*args).float().softmax(-1)

    return forward


def logits(model: nn.Module) -> Callable[..., torch.Tensor]:
    def forward(*args: Any) -> torch.Tensor:
        return model(*args).float()

    return forward


def _select(output: torch.Tensor, targets: Sequence[Target]) -> torch.Tensor:
    """output[i][targets[i]] for each example i: (N,)."""
    rows = [output[i][t] for i, t in enumerate(targets)]
    return torch.stack(rows)


def _embedding_probe(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None) -> int:
    """Saved activation bytes of one forward on one sequence, gradients flowing from the embeddings."""
    emb = model.get_input_embeddings()

    def leaf(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        return out.detach().requires_grad_()

    handle = emb.register_forward_hook(leaf)
    try:
        args = (input_ids[:1],) if mask is None else (input_ids[:1], mask[:1])
        return saved_activation_bytes(lambda: model(*args).float().sum(), model)
    finally:
        handle.remove()


def _integrated_gradients(
    algorithm: Any,
    inputs: torch.Tensor,
    baselines: torch.Tensor,
    targets: list[Target],
    forward: Callable[..., torch.Tensor],
    extra_args: tuple,
    n_steps: int,
    max_steps: int,
    ibs: int,
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """IG over examples in groups that fit `ibs`, doubling steps until completeness holds.

    Returns:
        The reduced attributions (N, ...) and a completeness record per example.
    """
    group = max(1, min(len(targets), ibs))
    scores, checks = [], []
    for start in range(0, len(targets), group):
        sl = slice(start, start + group)
        x, b, t = inputs[sl], baselines[sl], targets[sl]
        args = tuple(a[sl] for a in extra_args)
        with torch.no_grad():
            diff = (_select(forward(x, *args), t) - _select(forward(b, *args), t)).cpu()
        steps = n_steps
        while True:
            attrs = algorithm.attribute(
                x,
                baselines=b,
                target=t if len(t) > 1 else t[0],
                additional_forward_args=args or None,
                n_steps=steps,
                internal_batch_size=max(ibs, len(t)),
            )
            reduced = reduce(attrs.detach()).float().cpu()  # (n, ...)
            total = reduced.flatten(1).sum(1)
            error = (total - diff).abs() / diff.abs().clamp_min(MIN_OUTPUT_DIFFERENCE)
            if bool((error <= COMPLETENESS_TOLERANCE).all()) or steps * 2 > max_steps:
                break
            steps *= 2
        scores.append(reduced.numpy())
        checks += [
            {
                "attribution_sum": float(s),
                "output_difference": float(d),
                "relative_error": float(e),
                "n_steps": steps,
            }
            for s, d, e in zip(total, diff, error)
        ]
    return np.concatenate(scores), checks


def text_attributions(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    baseline_ids: torch.Tensor,
    targets: list[Target],
    method: str = "ig",
    n_steps: int = 50,
    max_steps: int = 400,
    memory_budget_mb: float = 2048,
) -> Attribution:
    """Per-token attributions of one sequence, for each target.

    Args:
        model: a text model with `get_input_embeddings()`.
        input_ids: (1, T) token ids; it is repeated once per target.
        attention_mask: (1, T) or None.
        baseline_ids: (1, T) the reference input (padding in place of the words).
        targets: a label index per explanation (classifiers), or (position, tag) pairs (taggers).
        method: "ig" or "saliency".
        n_steps: IG steps to start with; doubled while completeness fails, up to `max_steps`.
        memory_budget_mb: bound on the activations held at once.

    Returns:
        `Attribution` with scores (N, T), N = len(targets).
    """
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

    n = len(targets)
    ids = input_ids.expand(n, -1)
    mask = None if attention_mask is None else attention_mask.expand(n, -1)
    extra = () if mask is None else (mask,)
    emb = model.get_input_embeddings()
    if method == "saliency":
        # The gradient alone (multiply_by_inputs=False), its L2 norm over the embedding:
        # how much the target's logit moves per unit change of each token's vector.
        algo = LayerGradientXActivation(logits(model), emb, multiply_by_inputs=False)
        grads = algo.attribute(ids, target=targets if n > 1 else targets[0], additional_forward_args=extra or None)
        return Attribution(grads.detach().float().norm(dim=-1).cpu().numpy())
    if method != "ig":
        raise ValueError(f"unknown text attribution method {method!r}")
    ibs = internal_batch_size(_embedding_probe(model, input_ids, attention_mask), memory_budget_mb, n * max_steps)
    forward = probabilities(model)
    algo = LayerIntegratedGradients(forward, emb)
    scores, checks = _integrated_gradients(
        algo, ids, baseline_ids.expand(n, -1), targets, forward, extra, n_steps, max_steps, ibs,
        reduce=lambda a: a.sum(-1),  # (n, T, D) -> (n, T)
    )
    return Attribution(scores, ibs, checks)


def image_attributions(
    model: nn.Module,
    images: torch.Tensor,
    baseline: torch.Tensor,
    target: int,
    method: str = "ig",
    n_steps: int = 50,
    max_steps: int = 400,
    memory_budget_mb: float = 2048,
) -> Attribution:
    """Per-pixel attributions of one image: scores (1, H, W).

    Args:
        model: an image model (`cam_layer` needed for Grad-CAM).
        images: (1, C, H, W) as the model takes it.
        baseline: (1, C, H, W) the reference (a black image through the same preprocessing).
        target: the label index to explain.
        method: "ig" (signed, summed over channels), "saliency" (max |gradient| over
            channels) or "gradcam" (ReLU'd class activation map, upsampled to H x W).
    """
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

    height, width = images.shape[-2:]
    if method == "saliency":
        pixels = images.detach().clone().requires_grad_()
        grads = Saliency(logits(model)).attribute(pixels, target=target, abs=True)
        return Attribution(grads.detach().float().amax(1).cpu().numpy())
    if method == "gradcam":
        layer = getattr(model, "cam_layer", None)
        if layer is None:
            raise ValueError(f"{type(model).__name__} has no cam_layer for Grad-CAM")
        cam = LayerGradCam(logits(model), layer).attribute(images, target=target, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam.detach().float(), (height, width), interpolate_mode="bilinear")
        return Attribution(cam[:, 0].cpu().numpy())  # (1, H, W)
    if method != "ig":
        raise ValueError(f"unknown image attribution method {method!r}")
    probe = images[:1].detach().clone().requires_grad_()
    per_example = saved_activation_bytes(lambda: model(probe).float().sum(), model)
    ibs = internal_batch_size(per_example, memory_budget_mb, max_steps)
    forward = probabilities(model)
    scores, checks = _integrated_gradients(
        IntegratedGradients(forward), images, baseline, [target], forward, (), n_steps, max_steps, ibs,
        reduce=lambda a: a.sum(1),  # (1, C, H, W) -> (1, H, W)
    )
    return Attribution(scores, ibs, checks)
