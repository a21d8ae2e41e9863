"""A tqdm progress bar with loss, throughput and ETA; silent under `DAPENG_QUIET=1`, `--json` or no TTY."""

from __future__ import annotations

import os
import sys
from typing import Any


def quiet(json_output: bool = False) -> bool:
    """Whether progress output should be suppressed."""
    return json_output or os.environ.get("DAPENG_QUIET") == "1" or not sys.stderr.isatty()


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
