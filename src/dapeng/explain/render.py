"""Rendering explanations into files a person can open: self-contained HTML and PNG.

* text / tokens → HTML: the input with each word shaded by its attribution (diverging:
  orange for the label, blue against it), a legend, the prediction and its probability.
  No web fonts, no scripts, no external links: one file that opens anywhere.
* image → PNG: the input beside the heatmap laid over it.
* attention → PNG: a grid of every layer's heads, plus the rollout view.

Every kind renders to both formats: PNGs are embedded in the HTML page as data URIs, and
a text explanation's PNG is a bar chart of its words. The PNG's text chunks carry the
prediction ("Title", "Description") so tools can read it without looking at pixels.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dapeng._files import atomic_write
from dapeng.errors import DapengError

if TYPE_CHECKING:
    from dapeng.explain.explanation import Explanation

FOR = (214, 96, 77)  # attribution towards the label
AGAINST = (67, 147, 195)  # attribution away from it
MAX_AXIS_LABELS = 48  # attention maps longer than this lose their tick labels


def save(explanation: Explanation, path: Path) -> Path:
    """Write `explanation` to `path`, the format chosen by its suffix (.html or .png)."""
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        return atomic_write(path, lambda f: f.write(to_html(explanation).encode("utf-8")))
    if suffix == ".png":
        return atomic_write(path, lambda f: f.write(to_png(explanation)))
    raise DapengError(f"cannot render to {path.name!r}", "use a .html or .png file name")


def headline(e: Explanation) -> str:
    """One line: the prediction and what was explained."""
    line = f"predicted {e.predicted} ({e.predicted_probability:.1%})"
    if e.kind != "tokens" and e.label != e.predicted:
        line += f"; explaining {e.label} ({e.probability:.1%})"
    return f"{line} · {e.method}"


# ---------------------------------------------------------------- HTML


def _shade(score: float, scale: float) -> str:
    strength = min(1.0, abs(score) / scale) if scale > 0 else 0.0
    r, g, b = FOR if score >= 0 else AGAINST
    return f"rgba({r},{g},{b},{0.85 * strength:.3f})"


def _scale(scores: np.ndarray) -> float:
    finite = np.abs(scores[np.isfinite(scores)])
    return float(finite.max()) if finite.size else 0.0


def _shaded_words(e: Explanation, scores: np.ndarray, scale: float) -> str:
    """The input text with each word in a shaded span; the text between words kept as is."""
    words = e.words or []
    parts: list[str] = []
    if e.text is not None and e.spans is not None:
        cursor = 0
        for word_span, score in zip(e.spans, scores):
            start, end = word_span
            parts.append(html.escape(e.text[cursor:start]))
            parts.append(
                f'<span class="w" style="background:{_shade(score, scale)}" title="{score:+.4f}">'
                f"{html.escape(e.text[start:end])}</span>"
            )
            cursor = end
        parts.append(html.escape(e.text[cursor:]))
        return "".join(parts)
    return " ".join(
        f'<span class="w" style="background:{_shade(s, scale)}" title="{s:+.4f}">{html.escape(w)}</span>'
        for w, s in zip(words, scores)
    )


def _legend(label: str, signed: bool) -> str:
    lo = f"rgb{AGAINST}" if signed else "rgba(255,255,255,1)"
    left = f"against {html.escape(label)}" if signed else "no influence"
    return (
        '<div class="legend"><span>' + left + "</span>"
        f'<span class="bar" style="background:linear-gradient(to right,{lo},#fff,rgb{FOR})"></span>'
        f"<span>for {html.escape(label)}</span></div>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;max-width:60em;color:#222;line-height:1.5}
h1{font-size:1.3em;margin-bottom:.2em}.meta{color:#555;margin:.2em 0}
.text{font-size:1.15em;padding:1em;border:1px solid #ddd;border-radius:6px;white-space:pre-wrap}
.w{border-radius:3px;padding:0 1px}
.legend{display:flex;align-items:center;gap:.6em;margin:1em 0;font-size:.9em}
.bar{display:inline-block;width:14em;height:1em;border:1px solid #ccc}
table{border-collapse:collapse;margin-top:1em;font-size:.95em}td,th{padding:.25em .6em;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
img{max-width:100%}
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _top_words_table(e: Explanation, scores: np.ndarray, k: int = 10) -> str:
    if not e.words:
        return ""
    order = np.argsort(-scores)[:k]
    rows = "".join(
        f"<tr><td>{html.escape(e.words[i])}</td><td>{scores[i]:+.4f}</td></tr>" for i in order
    )
    return f"<table><tr><th>word</th><th>attribution</th></tr>{rows}</table>"


def _completeness_note(e: Explanation) -> str:
    if not e.completeness:
        return ""
    c = e.completeness
    return (
        f'<p class="meta">Integrated Gradients completeness: attributions sum to '
        f"{c['attribution_sum']:+.4f}, p(input) − p(baseline) = {c['output_difference']:+.4f} "
        f"(relative error {c['relative_error']:.1%}, {int(c['n_steps'])} steps).</p>"
    )


def to_html(e: Explanation) -> str:
    """A self-contained HTML page for any kind of explanation."""
    title = f"{e.method} explanation: {e.predicted}"
    head = (
        f"<h1>Prediction: {html.escape(e.predicted)} ({e.predicted_probability:.1%})</h1>"
        f'<p class="meta">Method: {html.escape(e.method)} · explained label: '
        f"{html.escape(e.label)} (probability {e.probability:.1%})</p>"
    )
    if e.kind == "text":
        scores = np.asarray(e.scores, dtype=np.float64)
        signed = bool((scores < 0).any())
        body = (
            head
            + _legend(e.label, signed)
            + f'<div class="text">{_shaded_words(e, scores, _scale(scores))}</div>'
            + _completeness_note(e)
            + _top_words_table(e, scores)
        )
    elif e.kind == "tokens":
        matrix = np.asarray(e.scores, dtype=np.float64)
        scale = _scale(matrix)
        rows = "".join(
            f"<tr><td>{html.escape(w)}</td><td>{html.escape(t)}</td>"
            f"<td>{_shaded_words(e, matrix[i], scale)}</td></tr>"
            for i, (w, t) in enumerate(zip(e.words or [], e.tags or []))
        )
        body = (
            f"<h1>Predicted tags: {html.escape(e.predicted)}</h1>"
            f'<p class="meta">Method: {html.escape(e.method)} · mean tag probability '
            f"{e.predicted_probability:.1%}. Each row shades the words that led to that word's tag.</p>"
            + _legend("the tag", True)
            + f"<table><tr><th>word</th><th>tag</th><th>attribution</th></tr>{rows}</table>"
        )
    else:
        png = base64.b64encode(to_png(e)).decode("ascii")
        body = head + f'<p><img alt="{html.escape(headline(e))}" src="data:image/png;base64,{png}"></p>'
        if e.kind == "image" and e.words and "word_scores" in e.extra:  # an image+text input: its question too
            scores = np.asarray(e.extra["word_scores"], dtype=np.float64)
            body += (
                "<h2>Question, word attributions (Integrated Gradients)</h2>"
                + _legend(e.label, bool((scores < 0).any()))
                + f'<div class="text">{_shaded_words(e, scores, _scale(scores))}</div>'
            )
        if e.kind == "attention" and e.words:
            scores = np.asarray(e.scores, dtype=np.float64)
            body += (
                _legend(e.label, False)
                + f'<div class="text">{_shaded_words(e, scores, _scale(scores))}</div>'
            )
        body += _completeness_note(e)
    return _page(title, body)


# ---------------------------------------------------------------- PNG


def _figure_bytes(fig, e: Explanation) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    meta = {
        "Title": headline(e),
        "Description": json.dumps(
            {"predicted": e.predicted, "probability": round(e.predicted_probability, 6), "label": e.label,
             "method": e.method}
        ),
        "Software": "dapeng",
    }
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata=meta)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _image_png(e: Explanation) -> bytes:
    plt = _pyplot()
    heat = np.asarray(e.scores, dtype=np.float64)
    image = e.image if e.image is not None else np.zeros((*heat.shape, 1))
    shown = image[..., 0] if image.shape[-1] == 1 else image
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.6))
    axes[0].imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
    axes[0].set_title("input")
    signed = bool((heat < 0).any())
    limit = _scale(heat) or 1.0
    axes[1].imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
    overlay = axes[1].imshow(
        heat,
        cmap="RdBu_r" if signed else "inferno",
        vmin=-limit if signed else 0,
        vmax=limit,
        # Signed maps fade where attribution is small, so the input shows through there.
        alpha=np.clip(np.abs(heat) / limit, 0, 1) * 0.9 if signed else 0.6,
        interpolation="nearest" if e.method != "gradcam" else "bilinear",
    )
    axes[1].set_title(f"{e.method}: {e.label}")
    fig.colorbar(overlay, ax=axes[1], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"predicted {e.predicted} ({e.predicted_probability:.1%})")
    return _figure_bytes(fig, e)


def _text_png(e: Explanation) -> bytes:
    plt = _pyplot()
    words = e.words or []
    scores = np.asarray(e.scores, dtype=np.float64)
    if e.kind == "tokens":
        scores = np.diag(scores) if scores.ndim == 2 else scores
    colors = [tuple(c / 255 for c in (FOR if s >= 0 else AGAINST)) for s in scores]
    fig, ax = plt.subplots(figsize=(7.5, max(2.0, 0.28 * len(words) + 1.2)))
    y = np.arange(len(words))
    ax.barh(y, scores, color=colors)
    ax.set_yticks(y, [f"{w} [{t}]" for w, t in zip(words, e.tags)] if e.tags else words)
    ax.invert_yaxis()
    ax.axvline(0, color="#444", linewidth=0.8)
    ax.set_xlabel(f"attribution to {e.label}" if e.kind == "text" else "attribution of each word to its own tag")
    ax.set_title(headline(e))
    return _figure_bytes(fig, e)


def _token_ticks(ax, tokens: list[str], shape: tuple[int, ...], bottom: bool, left: bool) -> None:
    """Token names on the outer axes of the grid, when there are few enough to read."""
    if not 0 < len(tokens) <= MAX_AXIS_LABELS:
        return
    if bottom and shape[-1] <= len(tokens):
        ax.set_xticks(range(shape[-1]), tokens[: shape[-1]], rotation=90, fontsize=5)
    if left and shape[0] == len(tokens):
        ax.set_yticks(range(shape[0]), tokens, fontsize=5)


def _attention_png(e: Explanation) -> bytes:
    plt = _pyplot()
    maps = [np.asarray(m, dtype=np.float64) for m in (e.attention or [])]
    # An LLM's prompt attention is one (H, S) row per layer: drawn as one heads x prompt panel.
    maps = [m[None] if m.ndim == 2 else m for m in maps]
    roll = None if e.rollout is None else np.asarray(e.rollout, dtype=np.float64)
    if roll is None and not maps:
        raise DapengError("this explanation has no attention maps to draw", "explain with method attention")
    layers = len(maps)
    heads = max((m.shape[0] for m in maps), default=0)
    cols = heads + (1 if roll is not None else 0)
    rows = max(layers, 1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.6, 1.9 * rows + 0.8), squeeze=False)
    tokens = e.tokens or []
    for li in range(rows):
        for hi in range(cols):
            ax = axes[li][hi]
            ax.set_xticks([])
            ax.set_yticks([])
            if li < layers and hi < maps[li].shape[0]:
                weights = maps[li][hi]
                ax.imshow(weights, cmap="viridis", vmin=0, aspect="auto")
                if li == 0:
                    ax.set_title(f"head {hi}", fontsize=8)
                if hi == 0:
                    ax.set_ylabel(f"layer {li}", fontsize=8)
                _token_ticks(ax, tokens, weights.shape, bottom=li == layers - 1, left=hi == 0)
            elif roll is not None and hi == cols - 1 and li == 0:
                ax.imshow(roll if roll.ndim == 2 else roll[None], cmap="magma", vmin=0, aspect="auto")
                ax.set_title("rollout", fontsize=8)
                if 0 < len(tokens) <= MAX_AXIS_LABELS:
                    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=5)
                    if roll.ndim == 2 and roll.shape[0] == len(tokens):
                        ax.set_yticks(range(len(tokens)), tokens, fontsize=5)
            else:
                ax.axis("off")
    fig.suptitle(headline(e), fontsize=10)
    fig.tight_layout()
    return _figure_bytes(fig, e)


def to_png(e: Explanation) -> bytes:
    """PNG bytes for any kind of explanation."""
    if e.kind == "image":
        return _image_png(e)
    if e.kind == "attention":
        return _attention_png(e)
    return _text_png(e)
