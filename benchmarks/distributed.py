"""Distributed training on the CPU: DDP and FSDP2 on 2 ranks of one thread against one process of two.

    python benchmarks/distributed.py            # the example Transformer and MiniLM fine-tuning
    python benchmarks/distributed.py --quick    # fewer records and steps (CI)

Each case is a real `dapeng` run (`dapeng.runner.train`) of an example config, started by
torchrun (gloo on 127.0.0.1) for the distributed ones, with the same global batch, data,
seed and fp32 everywhere:

- `1proc_2threads`: one process, two torch threads (the baseline: the same two cores);
- `1rank_1thread`: one process, one thread;
- `ddp`, `fsdp`: two ranks (`train.strategy`), one thread each.

Per case: `samples_per_s` (median of the logged training windows after the first, so
set-up and evaluation don't count), `peak_rss_mb_per_rank` (the largest rank's peak
resident memory), `state_mb_per_rank` (the parameters, gradients and optimizer state a
rank holds: FSDP shards all three) and `final_loss`. Ratios:
`ddp2_vs_1proc_2threads` = DDP samples/s ÷ the baseline's (above 1: two processes beat
two threads), `fsdp_memory_vs_ddp` = FSDP peak RSS ÷ DDP's (below 1: FSDP holds less;
the process's fixed cost, torch itself, is in both), `fsdp_state_memory_vs_ddp` the same for
the training state alone. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"transformer": "examples/rotten-tomatoes-transformer.yaml", "minilm": "examples/rotten-tomatoes-minilm.yaml"}
CASES = {  # name: (processes, threads per process, strategy)
    "1proc_2threads": (1, 2, "none"),
    "1rank_1thread": (1, 1, "none"),
    "ddp": (2, 1, "ddp"),
    "fsdp": (2, 1, "fsdp"),
}


class Memory:
    """Records the training state this rank holds (its shards under FSDP) when fit ends."""

    def __init__(self) -> None:
        self.state_bytes = 0

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor

        def local(t: torch.Tensor) -> int:
            t = t.to_local() if isinstance(t, DTensor) else t
            return t.numel() * t.element_size()

        params = [p for p in trainer.model.parameters() if p.requires_grad]
        state = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        # gradients are freed after each step (set_to_none): they take the parameters' size while they exist
        self.state_bytes = 2 * sum(local(p) for p in params) + sum(local(v) for v in state)


def worker(config: str, out: str, threads: int, overrides: list[str]) -> None:
    """One rank (or the single process) of a case; writes `OUT/rank{R}.json`."""
    torch.set_num_threads(threads)
    os.environ["DAPENG_QUIET"] = "1"
    from dapeng.config import load_config
    from dapeng.runner import train
    from dapeng.train import distributed

    memory = Memory()
    result = train(load_config(config, overrides), out, progress=False, callbacks=[memory])
    rank = distributed.world().rank
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "peak_rss_mb": peak, "state_mb": memory.state_bytes / 2**20, "final_loss": result["metrics"]["train"]["loss"],
    }))
    distributed.shutdown(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(config: str, overrides: list[str], procs: int, threads: int, strategy: str, out: Path) -> dict[str, Any]:
    args = [str(Path(__file__).resolve()), "--worker", str(ROOT / config), str(out), str(threads),
            *overrides, f"train.strategy={strategy}"]
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}", "--nnodes=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *args]
    else:
        command = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{config} {strategy} x{procs} failed: {done.stderr[-3000:]}")
    from dapeng.track import read_log

    windows = [r["train/samples_per_sec"] for r in read_log(out / "metrics.jsonl") if "train/samples_per_sec" in r]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]
    return {
        "samples_per_s": statistics.median(windows[1:] or windows),
        "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in ranks),
        "state_mb_per_rank": max(r["state_mb"] for r in ranks),
        "final_loss": ranks[0]["final_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer records and steps")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        config, out, threads, *overrides = args.worker
        worker(config, out, int(threads), overrides)
        return
    steps = 12 if args.quick else 60
    common = [f"data.limit={400 if args.quick else 2000}", f"train.max_steps={steps}", "train.epochs=1",
              "train.precision=fp32", "train.log_every=3", f"train.eval_every={steps + 1}", "train.batch_size=16"]
    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for model in args.models:
        config = MODELS[model]
        results[model] = {}
        for case, (procs, threads, strategy) in CASES.items():
            with tempfile.TemporaryDirectory(prefix=f"dapeng-bench-{model}-{case}-") as tmp:
                results[model][case] = run_case(config, common, procs, threads, strategy, Path(tmp) / "run")
            print(f"{model} {case}: {json.dumps(results[model][case])}", file=sys.stderr)
        r = results[model]
        ratios[model] = {
            "ddp2_vs_1proc_2threads": r["ddp"]["samples_per_s"] / r["1proc_2threads"]["samples_per_s"],
            "fsdp_memory_vs_ddp": r["fsdp"]["peak_rss_mb_per_rank"] / r["ddp"]["peak_rss_mb_per_rank"],
            "fsdp_state_memory_vs_ddp": r["fsdp"]["state_mb_per_rank"] / r["ddp"]["state_mb_per_rank"],
        }
    env = {"threads": "1 per rank / 2 in one process", "precision": "fp32", "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "quick": args.quick,
           "global_batch": 16, "steps": steps, "backend": "gloo"}
    print(json.dumps({"results": results, "ratios": ratios, "env": env}))


if __name__ == "__main__":
    main()
