"""TensorBoard event files (`tensorboard --logdir RUN/tb`) through torch's SummaryWriter."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoardLogger:
    """Writes every logged scalar (loss, metrics, learning rate, throughput) at its step.

    A resumed run purges the events the killed run wrote after its last checkpoint.
    """

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.writer: Any = None

    def open(self, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge_step)

    def on_fit_start(self, trainer: Any) -> None:
        self.start(trainer.state.step)

    def start(self, step: int = 0) -> None:
        """Begin a fit at `step`; a resumed fit (step > 0) hides events logged after it."""
        self.open(purge_step=step + 1 if step else None)

    def on_log(self, trainer: Any, logs: dict[str, Any]) -> None:
        if self.writer is None:
            self.open()
        step = logs.get("step", trainer.state.step if trainer is not None else 0)
        for name, value in logs.items():
            if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, global_step=step)

    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_fit_end(self, trainer: Any, summary: dict[str, Any] | None = None) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
