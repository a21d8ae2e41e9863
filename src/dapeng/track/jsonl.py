"""`metrics.jsonl`: one JSON object per log event, appended and flushed as it happens."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from dapeng._files import atomic_write


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics log (a torn last line from a killed run is skipped).

    Not a data reader: `dapeng.data.readers.read_jsonl` reads training records, strictly.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity: write them as null so every line stays standard JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlLogger:
    """Appends `{"step": ..., "time": ..., **logs}` lines to `path`.

    On a resumed run, lines logged after the resumed step (by the killed run, after its
    last checkpoint) are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_fit_start(self, trainer: Any) -> None:
        self.start(trainer.state.step)

    def start(self, step: int = 0) -> None:
        """Begin a fit at `step` (0: a fresh log; otherwise keep only lines up to `step`)."""
        kept = [r for r in read_log(self.path) if r.get("step", 0) <= step] if step else []
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))

    def on_log(self, trainer: Any, logs: dict[str, Any]) -> None:
        step = logs.get("step", trainer.state.step if trainer is not None else 0)
        record = {"step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in logs.items() if k != "step"}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
