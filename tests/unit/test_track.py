"""Tracking: TensorBoard events read back with TensorBoard's own reader, JSONL, progress, curves."""

import json
import types

import pytest
import torch
from _trainer_toy import ToyNet, ToyTask, make_records

from dapeng.track import JsonlLogger, ProgressBar, TensorBoardLogger, plot_curves, quiet, read_log
from dapeng.train.trainer import Trainer

torch.set_num_threads(1)


def fit_with(callbacks, tmp_path, epochs=2):
    records = make_records(64)
    task = ToyTask()
    task.setup(records)
    model = ToyNet(**task.model_kwargs())
    trainer = Trainer(model, task, epochs=epochs, batch_size=8, log_every=2, precision="fp32",
                      checkpoint_dir=tmp_path / "ckpt", callbacks=callbacks)
    trainer.fit(task.encode(records[:48]), task.encode(records[48:]))
    return trainer


def test_tensorboard_events_are_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit_with([TensorBoardLogger(tmp_path / "tb")], tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_sec", "eval/loss", "eval/accuracy"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [6, 12]


def test_jsonl_log_and_resume_truncation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    fit_with([JsonlLogger(path)], tmp_path)
    records = read_log(path)
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6, 8, 10, 12]
    assert all("time" in r for r in records)
    # a resumed run drops what the killed run logged after its checkpoint (step 6)
    with path.open("a") as f:
        f.write('{"step": 13, "train/lo')  # a torn last line
    JsonlLogger(path).start(6)
    assert max(r["step"] for r in read_log(path)) == 6
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_nan_is_written_as_null(tmp_path):
    logger = JsonlLogger(tmp_path / "m.jsonl")
    logger.on_log(None, {"step": 1, "train/loss": float("nan")})
    assert read_log(tmp_path / "m.jsonl")[0]["train/loss"] is None


def test_progress_bar_and_curves(tmp_path, capsys):
    jsonl = tmp_path / "metrics.jsonl"
    bar = ProgressBar()
    fit_with([bar, JsonlLogger(jsonl)], tmp_path)
    assert bar.bar is None  # closed at the end
    err = capsys.readouterr().err
    assert "12/12" in err and "loss=" in err
    png = plot_curves(read_log(jsonl), tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves([], tmp_path / "none.png") is None


def test_quiet(monkeypatch):
    monkeypatch.setenv("DAPENG_QUIET", "1")
    assert quiet()
    monkeypatch.delenv("DAPENG_QUIET")
    assert quiet(json_output=True)
    monkeypatch.setattr("sys.stderr", types.SimpleNamespace(isatty=lambda: False))
    assert quiet()


@pytest.mark.parametrize("logger", [JsonlLogger, TensorBoardLogger])
def test_trackers_work_from_a_hand_written_loop(tmp_path, logger):
    tracker = logger(tmp_path / "out")
    tracker.on_log(None, {"step": 1, "train/loss": 0.5})
    if isinstance(tracker, TensorBoardLogger):
        tracker.close()
    assert any((tmp_path / "out").parent.iterdir())


TRAIN_IN_A_PIPE = """
import sys
sys.path[:0] = [{src!r}, {tests!r}]
import torch
torch.set_num_threads(1)
from _trainer_toy import register, toy_splits
register()
import dapeng.runner
dapeng.runner.load_splits = toy_splits
from dapeng.cli.main import main
sys.exit(main(["train", {config!r}, "--out", {out!r}]))
"""


@pytest.mark.parametrize("quiet_env", [None, "1"], ids=["pipe", "DAPENG_QUIET=1"])
def test_training_into_a_pipe_prints_a_line_per_epoch(tmp_path, quiet_env):
    """stderr is a pipe (CI, nohup): one plain line per epoch/evaluation, none under DAPENG_QUIET=1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "task": "toy-classification", "data": {}, "model": {"name": "toy-mlp", "kwargs": {"hidden": 8}},
        "train": {"epochs": 3, "batch_size": 16, "precision": "fp32", "log_every": 2, "monitor": "eval/accuracy"},
    }))
    here = Path(__file__).resolve()
    code = TRAIN_IN_A_PIPE.format(src=str(here.parents[2] / "src"), tests=str(here.parent), config=str(config),
                                  out=str(tmp_path / "run"))
    env = {k: v for k, v in os.environ.items() if k != "DAPENG_QUIET"} | {"OMP_NUM_THREADS": "1"}
    if quiet_env:
        env["DAPENG_QUIET"] = quiet_env
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    if quiet_env:
        assert lines == []
        return
    assert len(lines) == 3, lines  # 112 records / 16 = 7 steps an epoch, evaluated after each
    for epoch, line in enumerate(lines, start=1):
        assert line.startswith(f"train toy-mlp: epoch {epoch}/3 step {7 * epoch}/21 loss "), line
        assert "eval/accuracy " in line and line.endswith(" samples/s")
        assert "\r" not in line and "\x1b" not in line  # plain text, not a bar's redraws
