"""Tracking: TensorBoard events, a JSONL metrics log, progress (a bar, or plain lines off a terminal), curves.

Each tracker is a Trainer callback by duck typing (it has `on_<event>(trainer, **info)`
methods) and never imports the Trainer, so a hand-written loop can drive it too: call
`start(step)` once, then `on_log(None, logs=...)` with a dict that holds a `step`.
"""

from __future__ import annotations

from dapeng.track.curves import plot_curves
from dapeng.track.jsonl import JsonlLogger, read_log
from dapeng.track.progress import LogLines, ProgressBar, progress_tracker, quiet
from dapeng.track.tensorboard import TensorBoardLogger

__all__ = ["JsonlLogger", "LogLines", "ProgressBar", "TensorBoardLogger", "plot_curves", "progress_tracker", "quiet",
           "read_log"]
