"""Progress on stderr: a tqdm bar on a terminal, one plain line per epoch/evaluation elsewhere.

`progress_tracker()` picks: a `ProgressBar` (loss, throughput, ETA) when stderr is a terminal,
`LogLines` when it is not (CI, nohup, a pipe: a bar's redraws would be noise, and nothing
until the end is worse), nothing under `DAPENG_QUIET=1` or `--json`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["LogLines", "ProgressBar", "progress_tracker", "quiet"]


def quiet(json_output: bool = False) -> bool:
    """Whether a live progress bar should be suppressed (`DAPENG_QUIET=1`, `--json`, or stderr no TTY)."""
    return json_output or os.environ.get("DAPENG_QUIET") == "1" or not sys.stderr.isatty()


def progress_tracker(desc: str = "train", json_output: bool = False) -> ProgressBar | LogLines | None:
    """The progress callback for a fit: a bar on a terminal, plain lines otherwise, None when silenced."""
    if json_output or os.environ.get("DAPENG_QUIET") == "1":
        return None
    return LogLines(desc) if quiet() else ProgressBar(desc)


class ProgressBar:
    """One bar over all optimizer steps of a fit, on stderr; tqdm computes the ETA."""

    def __init__(self, desc: str = "train") -> None:
        self.desc = desc
        self.bar: Any = None
        self.shown: dict[str, str] = {}  # training and evaluation values arrive in separate logs

    def on_fit_start(self, trainer: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.total_steps, initial=trainer.state.step, desc=self.desc, unit="step",
                        file=sys.stderr, dynamic_ncols=True, leave=True)

    def on_step_end(self, trainer: Any) -> None:
        self.bar.update(1)

    def on_log(self, trainer: Any, logs: dict[str, Any]) -> None:
        if self.bar is None:
            return
        shown = self.shown
        for key, label, fmt in (("train/loss", "loss", "{:.4f}"), ("train/samples_per_sec", "samples/s", "{:.0f}"),
                                (getattr(trainer, "monitor", ""), getattr(trainer, "monitor", ""), "{:.4f}")):
            if key in logs and logs[key] is not None:
                shown[label] = fmt.format(logs[key])
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def on_fit_end(self, trainer: Any, summary: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LogLines:
    """One plain stderr line per evaluation and per epoch (once per step), and at a stop mid-epoch:

    `train lstm: epoch 2/3 step 40/60 loss 0.4123 eval/accuracy 0.8450 1234 samples/s`
    """

    def __init__(self, desc: str = "train") -> None:
        self.desc = desc
        self.train: dict[str, Any] = {}  # the latest training log: loss and throughput
        self.last_step: int | None = None  # the step of the last line printed

    def on_log(self, trainer: Any, logs: dict[str, Any]) -> None:
        if "train/loss" in logs:
            self.train = logs

    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self._line(trainer, metrics)

    def on_epoch_end(self, trainer: Any) -> None:
        if self.last_step != trainer.state.step:
            self._line(trainer, {})

    def on_fit_end(self, trainer: Any, summary: dict[str, Any] | None = None) -> None:
        if self.last_step != trainer.state.step:
            self._line(trainer, {})

    def _line(self, trainer: Any, metrics: dict[str, float]) -> None:
        state = trainer.state
        epoch = state.epoch + (1 if state.batch else 0)  # mid-epoch (eval_every, a stop): the epoch under way
        parts = [f"{self.desc}: epoch {epoch}/{trainer.epochs} step {state.step}/{trainer.total_steps}"]
        monitor = getattr(trainer, "monitor", "")
        for label, value, fmt in (("loss", self.train.get("train/loss"), "{:.4f}"),
                                  (monitor, metrics.get(monitor), "{:.4f}")):
            if value is not None:
                parts.append(f"{label} {fmt.format(value)}")
        if self.train.get("train/samples_per_sec") is not None:
            parts.append(f"{self.train['train/samples_per_sec']:.0f} samples/s")
        print(" ".join(parts), file=sys.stderr, flush=True)
        self.last_step = state.step
