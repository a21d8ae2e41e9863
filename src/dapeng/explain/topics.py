"""What a topic model learned, for people to read and look at: each topic's top words, a document's
topic mix, and how much of a corpus each topic takes up over time (SOTU years).

    pipe = dapeng.load("runs/sotu-prodlda")
    topic_table(pipe)                           # [{"topic": 0, "words": [...], "weights": [...]}, ...]
    document_mixes(pipe, ["We must cut taxes."])
    years, share = prevalence(pipe, records, key="year")
    plot_topics(topic_table(pipe), "topics.png", (years, share))

The Pipeline's `predict`/`embed` give the mixes; the words come from the task (`topics`).
matplotlib loads only when drawing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dapeng.errors import DataError
from dapeng.tasks.base import UnsupportedError

__all__ = ["document_mixes", "plot_topics", "prevalence", "topic_table"]


def _topic_task(pipe: Any) -> Any:
    if not callable(getattr(pipe.task, "topics", None)):
        raise UnsupportedError(f"model {pipe.name!r} (task {pipe.task_name!r}) has no topics",
                               "pass a run trained with task: topic-model")
    return pipe.task


def topic_table(pipe: Any, n: int = 10) -> list[dict[str, Any]]:
    """Each topic's `n` top words with their weights, heaviest first."""
    topics = _topic_task(pipe).topics(pipe.model, n)
    return [{"topic": k, "words": [w for w, _ in words], "weights": [round(v, 4) for _, v in words]}
            for k, words in enumerate(topics)]


def document_mixes(pipe: Any, texts: Sequence[str], top: int = 3) -> list[dict[str, Any]]:
    """Each text's topic mix, and its `top` topics (largest share first)."""
    _topic_task(pipe)
    mixes = pipe.embed(list(texts))  # (n, K)
    return [{"text": text, "mix": [round(float(x), 4) for x in mix],
             "top": [{"topic": int(k), "share": round(float(mix[k]), 4)} for k in np.argsort(-mix)[:top]]}
            for text, mix in zip(texts, mixes)]


def prevalence(pipe: Any, records: Sequence[dict[str, Any]], key: str = "year") -> tuple[list[Any], np.ndarray]:
    """The mean topic mix of the records that share each value of `key`: (sorted values, (n_values, K))."""
    _topic_task(pipe)
    if not records or any(key not in r for r in records):
        raise DataError(f"topic prevalence needs a {key!r} in every record", f"use a data set whose records have {key!r}")
    mixes = pipe.embed([r["text"] for r in records])  # (n, K)
    values = sorted({r[key] for r in records})
    index = {v: i for i, v in enumerate(values)}
    sums = np.zeros((len(values), mixes.shape[1]))
    counts = np.zeros(len(values))
    for r, mix in zip(records, mixes):
        sums[index[r[key]]] += mix
        counts[index[r[key]]] += 1
    return values, sums / counts[:, None]


def _label(topic: dict[str, Any], words: int = 3) -> str:
    return f"{topic['topic']}: {' '.join(topic['words'][:words])}"


def plot_topics(topics: Sequence[dict[str, Any]], out: str | Path,
                by_year: tuple[Sequence[Any], np.ndarray] | None = None, title: str = "topics") -> Path:
    """Draw each topic's top words as bars, and (with `by_year`) topic prevalence over time as a heatmap.

    Args:
        topics: `topic_table` rows.
        out: the image file (.png, .svg, .pdf).
        by_year: `prevalence` output: the years and the (years, K) mean mixes.
        title: the figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise DataError(f"can't draw {out.name}: choose a .png, .svg or .pdf file")
    k = len(topics)
    cols = min(5, k)
    rows = -(-k // cols)
    heat_rows = 2 if by_year is not None else 0
    fig = plt.figure(figsize=(3.2 * cols, 2.6 * rows + 0.5 * k * heat_rows / 2 + 0.6))
    grid = fig.add_gridspec(rows + heat_rows, cols, height_ratios=[2.6] * rows + [0.25 * k] * heat_rows)
    for i, topic in enumerate(topics):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        words, weights = topic["words"][::-1], topic["weights"][::-1]
        ax.barh(range(len(words)), weights, color="tab:blue")
        ax.set_yticks(range(len(words)), words, fontsize=8)
        ax.set_title(f"topic {topic['topic']}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    if by_year is not None:
        years, share = by_year
        ax = fig.add_subplot(grid[rows:, :])
        image = ax.imshow(np.asarray(share).T, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(k), [_label(t) for t in topics], fontsize=7)
        step = max(1, len(years) // 20)
        ax.set_xticks(range(0, len(years), step), [str(y) for y in years[::step]], fontsize=7, rotation=90)
        ax.set_title("topic prevalence: the mean topic mix of each year's passages", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title above the first row of bars
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
