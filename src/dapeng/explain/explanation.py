"""The `Explanation`: what one call of `dapeng.explain.explain` returns for one input.

Plain numpy arrays and strings only, so an explanation can be saved, sent over HTTP
(`to_dict`) or rendered without the model that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# kind -> what `scores` holds
KINDS = {
    "text": "(W,) one attribution per word of `words`",
    "tokens": "(W, W) row i: attribution of every word to the tag predicted for word i",
    "image": "(H, W) one attribution per pixel, the input's spatial size",
    "attention": "(W,) rollout or prompt attention per word; the maps are in `attention`/`rollout`",
}


@dataclass
class Explanation:
    """One input's explanation.

    Attributes:
        method: "ig", "saliency", "gradcam", "attention" or "rollout".
        kind: "text", "tokens" (per-token tagging), "image" or "attention" (see `KINDS`).
        label: the label explained (the target); for taggers "per-token".
        label_index: its index in the pipeline's labels (-1 for taggers).
        probability: the model's probability of `label` for this input.
        predicted: the predicted label (for taggers the predicted tags, space-separated).
        predicted_probability: its probability (for taggers the mean over words).
        scores: the attribution array, shaped as `KINDS[kind]` says.
        text: the input text (text kinds), so words can be shown in place.
        words: the words, in order (text kinds).
        spans: (start, end) character offsets of each word in `text`.
        tags: the predicted tag of each word (taggers only).
        image: the input as (H, W, C) floats in [0, 1] (images only), for the overlay.
        tokens: token strings on the axes of the attention maps.
        attention: per layer, the (H, T, S) attention weights of every head.
        rollout: the (T, S) attention rollout across layers.
        completeness: Integrated Gradients' check, {"attribution_sum", "output_difference",
            "relative_error", "n_steps"}: the attributions should sum to f(x) - f(baseline).
        internal_batch_size: the number of examples per forward chosen to fit the memory budget.
    """

    method: str
    kind: str
    label: str
    label_index: int
    probability: float
    predicted: str
    predicted_probability: float
    scores: np.ndarray
    text: str | None = None
    words: list[str] | None = None
    spans: list[tuple[int, int]] | None = None
    tags: list[str] | None = None
    image: np.ndarray | None = None
    tokens: list[str] | None = None
    attention: list[np.ndarray] | None = None
    rollout: np.ndarray | None = None
    completeness: dict[str, float] | None = None
    internal_batch_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, include_maps: bool = False) -> dict[str, Any]:
        """A JSON-able dict (for `--json` and the HTTP server).

        Args:
            include_maps: also include the per-layer attention maps (large for long inputs).
        """
        out: dict[str, Any] = {
            "method": self.method,
            "kind": self.kind,
            "label": self.label,
            "label_index": self.label_index,
            "probability": self.probability,
            "predicted": self.predicted,
            "predicted_probability": self.predicted_probability,
            "scores": np.asarray(self.scores, dtype=np.float64).round(6).tolist(),
        }
        for key in ("text", "words", "spans", "tags", "tokens", "completeness", "internal_batch_size"):
            value = getattr(self, key)
            if value is not None:
                out[key] = [list(s) for s in value] if key == "spans" else value
        if self.rollout is not None:
            out["rollout"] = np.asarray(self.rollout, dtype=np.float64).round(6).tolist()
        if include_maps and self.attention is not None:
            out["attention"] = [np.asarray(a, dtype=np.float64).round(6).tolist() for a in self.attention]
        return out

    def save(self, path: str | Path) -> Path:
        """Render to `path`: ".html" (self-contained page) or ".png" (heatmap image).

        Returns:
            The path written (atomically: temp file then rename).
        """
        from dapeng.explain.render import save

        return save(self, Path(path))
