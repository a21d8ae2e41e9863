"""The training-curve PNG written into the run directory at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(records: list[dict[str, Any]], path: str | Path, title: str = "training curves") -> Path | None:
    """Plot training loss and every evaluation metric against the step; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[float], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if (key == "train/loss" or key.startswith("eval/")) and isinstance(value, int | float):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(record["step"])
                ys.append(value)
    if not series:
        return None
    metrics = sorted(k for k in series if not k.endswith("/loss"))
    fig, axes = plt.subplots(1, 2 if metrics else 1, figsize=(11 if metrics else 6, 4), squeeze=False)
    for key in ("train/loss", "eval/loss"):
        if key in series:
            axes[0][0].plot(*series[key], marker="." if key.startswith("eval") else None, label=key)
    axes[0][0].set(xlabel="step", ylabel="loss", title="loss")
    axes[0][0].legend()
    if metrics:
        for key in metrics:
            axes[0][1].plot(*series[key], marker=".", label=key)
        axes[0][1].set(xlabel="step", title="evaluation")
        axes[0][1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
