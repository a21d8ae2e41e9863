"""Distributed training on 2 real processes: torchrun, gloo, 127.0.0.1, one thread per rank.

The toy task runs in `_dist_worker.py` (each rank); the references run in this process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import _trainer_toy as toy  # noqa: E402

import dapeng.runner as runner  # noqa: E402
from dapeng.config import load_config  # noqa: E402
from dapeng.hub.artifact import load_artifact  # noqa: E402
from dapeng.track import read_log  # noqa: E402
from dapeng.train.checkpoint import load_checkpoint  # noqa: E402
from dapeng.train.sampler import ResumableBatchSampler  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_dist_worker.py"
TP_WORKER = HERE / "_tp_worker.py"
SRC = HERE.parents[1] / "src"
# 160 toy records → 112 training items: 7 global batches of 16 an epoch, in groups of 2 → 4 steps
STEPS = 2 * 4
TRAIN = {"epochs": 2, "batch_size": 16, "grad_accum": 2, "grad_clip": 0.5, "precision": "fp32",
         "deterministic": True, "seed": 3, "log_every": 1, "optimizer": {"name": "adamw", "lr": 0.01},
         "schedule": {"name": "cosine", "warmup_steps": 2}, "checkpoint_every": 2, "eval_every": 3,
         "monitor": "eval/loss", "dist_timeout": 120}


def write_config(path: Path, **train) -> Path:
    # no dropout: one process draws one mask over the batch of 16, two ranks two over 8 each
    path.write_text(yaml.safe_dump({"task": "toy-classification", "data": {},
                                    "model": {"name": "toy-mlp", "kwargs": {"dropout": 0.0}},
                                    "train": {**TRAIN, **train}}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "DAPENG_QUIET": "1", "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1", **extra}


def torchrun_args(nproc: int, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
            f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]


def run_ranks(nproc: int, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    """`_dist_worker.py ARGS` on `nproc` ranks (1: a plain process, no torchrun)."""
    command = [*torchrun_args(nproc), str(WORKER)] if nproc > 1 else [sys.executable, str(WORKER)]
    result = subprocess.run([*command, *args], env=env(**extra), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run: Path) -> list[float]:
    return [r["train/loss"] for r in read_log(run / "metrics.jsonl") if "train/loss" in r]


def one_process_run(path: Path, monkeypatch, **train) -> Path:
    """The single-process reference, in this process with one thread."""
    torch.set_num_threads(1)
    toy.register()
    monkeypatch.setattr(runner, "load_splits", toy.toy_splits)
    out = path / "one"
    runner.train(load_config(write_config(path / "one.yaml", **train)), out, progress=False)
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank DDP run of the toy config."""
    path = tmp_path_factory.mktemp("ddp")
    out = path / "run"
    run_ranks(2, "train", str(write_config(path / "toy.yaml")), "--out", str(out))
    return out


def test_sampler_slices_each_global_batch_evenly():
    one = list(ResumableBatchSampler(21, 8, seed=4))
    ranks = [list(ResumableBatchSampler(21, 8, seed=4, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 3  # every rank steps as often: no deadlock
    for b, batch in enumerate(one[:-1]):
        assert ranks[0][b] + ranks[1][b] == batch  # the same items as one process, split in two
    last = ranks[0][-1] + ranks[1][-1]
    assert len(ranks[0][-1]) == len(ranks[1][-1]) == 3 and last[:5] == one[-1]  # 5 left: padded to 6
    resumed = ResumableBatchSampler(21, 8, seed=4, num_replicas=2, rank=1)
    resumed.set_epoch(0, start=1)  # the position is a global batch index, the same on any world size
    assert list(resumed) == ranks[1][1:]


def test_ddp_two_ranks_match_one_process(ddp_run, tmp_path, monkeypatch):
    one = one_process_run(tmp_path, monkeypatch)
    a, b = losses(one), losses(ddp_run)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)) < 1e-5
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2 and metrics["train"]["strategy"] == "ddp"
    assert metrics["train"]["samples"] == json.loads((one / "metrics.json").read_text())["train"]["samples"]
    # rank 0 alone writes: each step logged once, one TensorBoard event file
    steps = [r["step"] for r in read_log(ddp_run / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1))
    assert len(list((ddp_run / "tb").glob("events.out.tfevents.*"))) == 1
    weights_one, weights_two = load_file(one / "model/model.safetensors"), load_file(ddp_run / "model/model.safetensors")
    assert all(torch.allclose(weights_one[k], weights_two[k], rtol=1e-5, atol=1e-6) for k in weights_one)


def test_fsdp_sharded_checkpoints_resume_on_another_world_size(tmp_path, monkeypatch):
    cfg = str(write_config(tmp_path / "fsdp.yaml", strategy="fsdp"))
    # stops (a clean StopTraining ends a step before its evaluation) at steps 2 and 5: evaluations are at 3 and 6
    out = tmp_path / "run"
    run_ranks(1, "train", cfg, "--out", str(out), TOY_STOP_AT="2")  # 1 process: a group of one
    shards = sorted(p.name for p in (out / "checkpoints" / "last").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "trainer.pt"]
    run_ranks(2, "train", cfg, "--out", str(out), "--resume", TOY_STOP_AT="5")  # 1 → 2
    assert sorted(p.name for p in (out / "checkpoints" / "last").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    run_ranks(1, "train", cfg, "--out", str(out), "--resume")  # 2 → 1
    assert load_checkpoint(out / "checkpoints" / "last" / "trainer.pt")["trainer"]["step"] == STEPS

    one = one_process_run(tmp_path, monkeypatch)  # uninterrupted, one process, no sharding
    a, b = losses(one), losses(out)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)) < 1e-5
    # model/ is a plain Artifact (full tensors, no DTensor), loadable and equal to the reference's
    artifact = load_artifact(out / "model")
    reference = load_file(one / "model/model.safetensors")
    assert all(torch.allclose(v, reference[k], rtol=1e-5, atol=1e-6) for k, v in artifact.model.state_dict().items())


def test_tensor_parallel_matches_unsharded(tmp_path):
    result = subprocess.run([*torchrun_args(2), str(TP_WORKER), str(tmp_path)], env=env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world"] == 2
        assert report["logits_diff"] <= 1e-5 * report["logits_scale"]
        assert report["grad_diff"] <= 1e-5 * report["grad_scale"]
        assert 0.45 < report["sharded_fraction"] < 0.55  # each rank holds half of every block's weights


def test_unequal_data_neither_deadlocks_nor_double_counts_evaluation(tmp_path, monkeypatch):
    # 170 records: 119 training items, so the last global batch of 8 holds 7 (padded to 4 + 4); 26 test items
    cfg = str(write_config(tmp_path / "odd.yaml", strategy="fsdp", epochs=1, batch_size=8, grad_accum=1))
    out = tmp_path / "run"
    run_ranks(2, "train", cfg, "--out", str(out), TOY_RECORDS="170", timeout=240)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 15  # ceil(119 / 8): both ranks took every step

    # the test figures are those of one pass over each of the 26 test items
    from dapeng.train.trainer import Trainer

    monkeypatch.setenv("TOY_RECORDS", "170")
    sys.path.insert(0, str(HERE))
    import _dist_worker

    toy.register()
    artifact = load_artifact(out / "model")
    test_items = artifact.task.encode(_dist_worker.splits().test)
    assert len(test_items) == 26
    expected = Trainer(artifact.model, artifact.task, precision="fp32", batch_size=4).evaluate(test_items, "test")
    assert metrics["test"]["loss"] == pytest.approx(expected["test/loss"], rel=1e-6)
    assert metrics["test"]["accuracy"] == pytest.approx(expected["test/accuracy"], rel=1e-9)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DAPENG_ELASTIC_TESTS") != "1",
                    reason="flaky: after torchrun's restart, gloo's connectFullMesh in the restarted ranks sometimes "
                    "hangs or is refused (4 of 6 runs on a loaded 2-core machine); DAPENG_ELASTIC_TESTS=1 runs it")
def test_sigkill_of_a_rank_restarts_and_resumes_to_the_same_weights(ddp_run, tmp_path):
    cfg = str(write_config(tmp_path / "toy.yaml"))
    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([*torchrun_args(2, max_restarts=1), str(WORKER), "train", cfg, "--out", str(out)],
                            env=env(TOY_STEP_DELAY="0.3", TOY_PID_DIR=str(pids)), stdout=subprocess.DEVNULL,
                            stderr=log, text=True, start_new_session=True)
    stderr = (tmp_path / "stderr.txt").read_text
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [r["step"] for r in read_log(out / "metrics.jsonl")]
            if steps and max(steps) >= 3:  # past the checkpoint at step 2, mid-epoch 1
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {stderr()[-2000:]}"
        os.kill(int((pids / "rank1").read_text()), signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, stderr()[-3000:]  # torchrun restarted both ranks, which resumed
    finally:
        if proc.poll() is None:  # a failed test leaves no torchrun behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    a, b = load_checkpoint(ddp_run / "checkpoints/last.pt"), load_checkpoint(out / "checkpoints/last.pt")
    assert a["trainer"]["step"] == b["trainer"]["step"] == STEPS
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    steps = [r["step"] for r in read_log(out / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1))


def test_a_rank_that_fails_to_start_ends_in_one_line(tmp_path, monkeypatch, capsys):
    from dapeng.cli.main import main
    from dapeng.train import distributed

    real = distributed.torchrun_command

    def toy_torchrun(args, **kwargs):  # the launcher's command, running the toy worker instead of `-m dapeng`
        command = real(args, **kwargs)
        at = command.index("dapeng")
        return [*command[:at - 1], str(WORKER), *command[at + 1:]]

    monkeypatch.setattr(distributed, "torchrun_command", toy_torchrun)
    for key, value in env(TOY_FAIL_RANK="1").items():
        monkeypatch.setenv(key, value)
    code = main(["train", str(write_config(tmp_path / "toy.yaml")), "--out", str(tmp_path / "run"), "--nproc", "2"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("dapeng train: error:")]
    assert len(lines) == 1 and "rank 1 exited with code 1" in lines[0], err
    assert "Traceback" not in err and "ChildFailedError" not in err


DIGITS = {"task": "image-classification", "data": {"dataset": "digits", "limit": 120},
          "model": {"name": "mlp", "kwargs": {"hidden": 16, "layers": 1}},
          "train": {"epochs": 1, "batch_size": 16, "precision": "fp32", "log_every": 1}}


def test_two_nodes_from_the_command_line(tmp_path):
    """`dapeng train --nproc 1 --nnodes 2` on two "nodes" (each its own torchrun, `-m dapeng train` in
    each process) meeting at a c10d rendezvous on 127.0.0.1: one run of world size 2."""
    cfg = tmp_path / "digits.yaml"
    cfg.write_text(yaml.safe_dump(DIGITS))
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "dapeng", "train", str(cfg), "--out", str(tmp_path / "run"),
                               "--json", "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank),
                               "--rdzv-endpoint", endpoint], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
        outputs.append(stdout.strip())
    reports = [out for out in outputs if out]  # only global rank 0 reports (c10d picks which node it is on)
    assert len(reports) == 1 and json.loads(reports[0].splitlines()[-1])["metrics"]["train"]["world_size"] == 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2 and metrics["train"]["strategy"] == "ddp"
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_several_nodes_need_a_rendezvous_endpoint(tmp_path, capsys):
    from dapeng.cli.main import main

    assert main(["train", str(write_config(tmp_path / "toy.yaml")), "--nproc", "2", "--nnodes", "2"]) == 2
    assert "--nnodes 2 needs --rdzv-endpoint HOST:PORT" in capsys.readouterr().err
