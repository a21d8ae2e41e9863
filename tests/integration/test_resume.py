"""Exact resume: a run SIGKILLed mid-epoch and resumed ends bit-identical to a straight run (fp32, deterministic)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import _trainer_toy as toy  # noqa: E402

import dapeng.runner as runner  # noqa: E402
from dapeng.config import load_config  # noqa: E402
from dapeng.track import read_log  # noqa: E402
from dapeng.train.checkpoint import load_checkpoint  # noqa: E402

WORKER = Path(__file__).with_name("_resume_worker.py")
TOTAL_STEPS = 3 * 7  # 3 epochs of 112 records in batches of 16


def config(tmp_path: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({
        "task": "toy-classification", "data": {}, "model": {"name": "toy-mlp", "kwargs": {"dropout": 0.2}},
        "train": {"epochs": 3, "batch_size": 16, "precision": "fp32", "deterministic": True, "seed": 3,
                  "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
                  "schedule": {"name": "cosine", "warmup_steps": 5}, "checkpoint_every": 4, "log_every": 1,
                  "monitor": "eval/accuracy", "eval_every": 5},
    }))
    return path


def test_sigkill_then_resume_is_bit_identical(tmp_path, monkeypatch):
    cfg_path = config(tmp_path)
    env = {**os.environ, "DAPENG_QUIET": "1", "TOY_STEP_DELAY": "0.2"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(WORKER), "train", str(cfg_path), "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [r["step"] for r in read_log(killed / "metrics.jsonl")]
        if steps and max(steps) >= 10:  # mid-epoch 2, between checkpoints (every 4 steps)
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    last = load_checkpoint(killed / "checkpoints" / "last.pt")  # the last good checkpoint survives the kill
    assert 8 <= last["trainer"]["step"] < TOTAL_STEPS
    assert not (killed / "model").exists()

    env.pop("TOY_STEP_DELAY")
    resumed = subprocess.run([sys.executable, str(WORKER), "train", str(cfg_path), "--out", str(killed), "--resume"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    # the straight run, in this process with the same single thread
    torch.set_num_threads(1)
    toy.register()
    monkeypatch.setattr(runner, "load_splits", toy.toy_splits)
    straight = tmp_path / "straight"
    runner.train(load_config(cfg_path), straight, progress=False)

    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert a["trainer"]["step"] == b["trainer"]["step"] == TOTAL_STEPS
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    best_a, best_b = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert a["trainer"]["best"] == b["trainer"]["best"] and a["trainer"]["best_step"] == b["trainer"]["best_step"]
    # the resumed log reads as one run: each step once, in order
    steps = [r["step"] for r in read_log(killed / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, TOTAL_STEPS + 1))
