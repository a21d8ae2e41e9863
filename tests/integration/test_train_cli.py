"""`dapeng train` and `dapeng eval` end to end on real data (scikit-learn's digits) with a real model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CONFIG = {
    "task": "image-classification",
    "data": {"dataset": "digits"},
    "model": {"name": "mlp", "kwargs": {"hidden": 64, "layers": 1}},
    "train": {"epochs": 3, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 3.0e-3},
              "schedule": {"name": "cosine", "warmup_steps": 10}, "monitor": "eval/accuracy", "log_every": 10},
}


def dapeng(*args: str) -> subprocess.CompletedProcess:
    # One OpenMP thread: on CI's 2 shared cores, 2 threads per process oversubscribe and crawl.
    env = {**os.environ, "DAPENG_QUIET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dapeng", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.data
def test_train_and_eval_digits(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tmp_path / "digits.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    run = tmp_path / "run"
    result = dapeng("train", str(config), "--out", str(run), "--json", "--set", "train.precision=fp32")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["metrics"]["test"]["accuracy"] > 0.85  # 10 classes: chance is 0.1

    # the run directory contract of DESIGN.md
    for name in ("config.yaml", "model/model.safetensors", "model/dapeng.json", "model/card.md",
                 "checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "metrics.json", "curves.png",
                 "test_confusion_matrix.png", "test_classification_report.json"):
        assert (run / name).is_file(), name
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["precision"] == "fp32" and resolved["train"]["optimizer"]["weight_decay"] == 0.0
    meta = json.loads((run / "model" / "dapeng.json").read_text())
    assert meta["task"] == "image-classification" and meta["model"]["name"] == "mlp"
    assert meta["labels"] == [str(i) for i in range(10)] or meta["labels"] == list(range(10))
    assert "BSD-3-Clause" in (run / "model" / "card.md").read_text()
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/samples_per_sec", "eval/accuracy"} <= set(acc.Tags()["scalars"])

    # eval in this process (a third interpreter start costs more than the evaluation)
    from dapeng.cli.main import main

    assert main(["eval", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["accuracy"] == pytest.approx(summary["metrics"]["test"]["accuracy"])
    assert main(["eval", str(run), "--split", "eval"]) == 0
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.data
def test_custom_loop_example(tmp_path, monkeypatch):
    """examples/custom_loop.py trains with the same pieces as Trainer.fit and resumes from its checkpoint."""
    import runpy

    import torch

    from dapeng.hub.artifact import load_artifact
    from dapeng.track import read_log

    torch.set_num_threads(1)
    example = runpy.run_path(str(Path(__file__).parents[2] / "examples" / "custom_loop.py"))
    out = tmp_path / "loop"
    metrics = example["main"](["--out", str(out), "--epochs", "2", "--precision", "fp32"])
    assert metrics["eval/accuracy"] > 0.8
    assert load_artifact(out / "model").meta["model"]["name"] == "mlp"
    assert (out / "curves.png").is_file() and any((out / "tb").iterdir())
    example["main"](["--out", str(out), "--epochs", "3", "--precision", "fp32", "--resume"])
    steps = [r["step"] for r in read_log(out / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)) and len(steps) == 3 * 45 // 10
