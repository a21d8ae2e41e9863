"""Model cards: a short Markdown page for every stored model (data, license, metrics, parent, use)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["render_card"]

_INTENDED_USE = {
    "text-classification": "Classify short English texts into the labels below.",
    "token-classification": "Tag each token of a sentence (POS, NER) with the labels below.",
    "sentence-embedding": "Embed sentences as unit vectors for semantic search, clustering and similarity.",
    "causal-lm": "Generate or continue English text; chat through the chat template.",
    "image-classification": "Classify small images into the labels below.",
}


def _line(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def render_card(
    meta: dict[str, Any],
    *,
    name: str | None = None,
    summary: str | None = None,
    data: str | None = None,
    license: str | None = None,
    intended_use: str | None = None,
    limits: str | None = None,
) -> str:
    """Render a model card from an Artifact's `dapeng.json` plus what only the caller knows.

    Fields missing from both say so, rather than being left out, so a reader can tell
    "unknown" from "forgotten".

    Args:
        meta: the Artifact's `dapeng.json` dict.
        name: the hub name (title of the card).
        summary: one paragraph on what the model is.
        data: the training data and where it came from.
        license: license of the weights and of the data.
        intended_use: what the model is for; defaults to a sentence per task.
        limits: known limitations.
    """
    model = meta.get("model", {})
    task = meta.get("task", "unknown")
    if data is None and meta.get("data"):
        data = _line(meta["data"])
    lines = [f"# {name or model.get('name', 'model')}", ""]
    if summary:
        lines += [summary, ""]
    lines += [
        f"- **Task:** {task}",
        f"- **Architecture:** `{model.get('name', 'unknown')}` {_line(model.get('kwargs', {}))}",
        f"- **Parent model:** {_line(meta['parent']) if meta.get('parent') else 'none (trained from scratch)'}",
        f"- **Quantization:** {_line(meta['quantization']) if meta.get('quantization') else 'none'}",
        f"- **dapeng version:** {meta.get('dapeng', 'unknown')}",
        "",
        "## Data",
        "",
        data or "Not recorded.",
        "",
        "## License",
        "",
        license or _line(meta.get("license") or "Not recorded: check the licenses of the parent model and the data."),
        "",
        "## Metrics",
        "",
    ]
    metrics = meta.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {_line(v)} |" for k, v in _flat(metrics)]
    else:
        lines.append("None recorded.")
    labels = meta.get("labels")
    if labels:
        lines += ["", "## Labels", "", ", ".join(map(str, labels))]
    lines += [
        "",
        "## Intended use",
        "",
        intended_use or _INTENDED_USE.get(task, "Research and prototyping."),
        "",
        "## Limits",
        "",
        limits or "Evaluated only on the data above; expect lower accuracy on text or images unlike it.",
        "",
    ]
    return "\n".join(lines)


def _flat(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}/")
        else:
            out.append((f"{prefix}{key}", value))
    return out
