"""`dapeng train CONFIG --out RUN [--set a.b=c ...] [--resume] [--json] [--nproc N [--nnodes M ...]]`.

`--nproc N` starts torchrun, which runs `python -m dapeng train ...` on N processes
(`train.strategy` picks DDP, FSDP or tensor parallelism); `torchrun --nproc-per-node N -m
dapeng train CONFIG` does the same by hand. Several machines: the same command on each, with
`--nnodes M --rdzv-endpoint HOST:PORT` (HOST: one of the machines, reachable from all).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

EXAMPLE = """example:
  dapeng train examples/fashion-mnist-cnn.yaml --out runs/fm
  dapeng train examples/fashion-mnist-cnn.yaml --out runs/fm --set train.epochs=1 --set train.precision=fp32
  dapeng train examples/fashion-mnist-cnn.yaml --out runs/fm --resume     # continue a killed run exactly
  dapeng train examples/fashion-mnist-cnn.yaml --out runs/fm --nproc 2    # two processes (DDP)
  torchrun --nproc-per-node 2 -m dapeng train examples/fashion-mnist-cnn.yaml --out runs/fm   # the same
  # two machines, 4 processes each (run on both; HOST is the first machine):
  dapeng train CONFIG --out RUN --nproc 4 --nnodes 2 --rdzv-endpoint HOST:29400"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML config into a run directory",
        description="Train the model a YAML run config describes. Writes RUN/config.yaml, RUN/model/ "
        "(the best checkpoint as an Artifact), RUN/checkpoints/, RUN/metrics.jsonl, RUN/metrics.json, "
        "RUN/tb/ (TensorBoard) and RUN/curves.png.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, help="YAML run config (task, data, model, train)")
    add_run_arguments(p, "runs/<config name>")
    dist = p.add_argument_group("many processes (torchrun)")
    dist.add_argument("--nproc", type=int, default=None, metavar="N", help="processes on this machine")
    dist.add_argument("--nnodes", default="1", metavar="M", help="machines (default 1; MIN:MAX for elastic)")
    dist.add_argument("--node-rank", type=int, default=None, help="this machine's rank (default: assigned)")
    dist.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                      help="rendezvous address shared by all machines (needed with --nnodes)")
    dist.add_argument("--max-restarts", type=int, default=0,
                      help="restart all processes this often after a failure, resuming from the last checkpoint")
    return p


def add_run_arguments(p: argparse.ArgumentParser, default_out: str) -> None:
    """--out, --set, --resume and --json: what every verb that writes a run directory takes."""
    p.add_argument("--out", type=Path, default=None, help=f"run directory (default: {default_out})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.optimizer.lr=3e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (no progress bar)")


def run(args: argparse.Namespace) -> int:
    from dapeng.errors import DapengError
    from dapeng.train import distributed

    if distributed.launched():
        distributed.shutdown(_run_rank(args))
    if args.nproc is not None or args.nnodes != "1":
        return _launch(args)
    try:
        code = _train(args)
    except DapengError as err:
        if not distributed.initialized():
            raise
        print(f"dapeng train: error: {err}", file=sys.stderr)
        code = 2
    if distributed.initialized():  # FSDP/TP on one process made a group of one: leave it as ranks do
        distributed.shutdown(code)
    return code


def _launch(args: argparse.Namespace) -> int:
    """Run this command on `--nproc` processes through torchrun; a failure ends in one line."""
    from dapeng.errors import ConfigError
    from dapeng.train.distributed import torchrun_command

    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc} is not a number of processes", "use 1 or more")
    child = ["train", str(args.config), "--out", str(args.out or Path("runs") / args.config.stem)]
    child += [arg for item in args.overrides for arg in ("--set", item)]
    child += [flag for flag, on in (("--resume", args.resume), ("--json", args.json), ("--debug", args.debug)) if on]
    command = torchrun_command(child, nproc=args.nproc or 1, nnodes=args.nnodes, node_rank=args.node_rank,
                               rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts)
    with tempfile.TemporaryDirectory(prefix="dapeng-ranks-") as errors:
        env = {**os.environ, ERROR_DIR: errors}
        proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        report: list[str] = []
        forward = threading.Thread(target=_forward_stderr, args=(proc.stderr, report, args.debug), daemon=True)
        forward.start()
        code = proc.wait()
        forward.join()
        if code == 0:
            return 0
        cause = _root_cause(report, code, Path(errors))
    raise ConfigError(f"{cause} (the other processes were stopped)",
                      None if args.debug else "rerun with --debug for the tracebacks")


ERROR_DIR = "DAPENG_RANK_ERRORS"  # where each rank's one-line failure goes, for the launching command
_LOG_LINE = re.compile(r"^[WEIF]\d{4} \d\d:\d\d:\d\d")  # torchrun's own (glog-style) log lines


def _forward_stderr(stream: Any, report: list[str], raw: bool) -> None:
    """Pass the processes' stderr through; keep torchrun's own log and failure report aside (one line
    replaces it) unless `raw`."""
    in_report = False
    for line in stream:
        in_report = in_report or line.startswith("Traceback") or "torch.distributed.elastic" in line
        if raw or not (in_report or _LOG_LINE.match(line) or line.startswith("*****")):
            sys.stderr.write(line)
        else:
            report.append(line)


def _root_cause(report: list[str], code: int, errors: Path) -> str:
    """The first failure: torchrun's root-cause rank, in that rank's own words where it left them."""
    root = "".join(report).split("Root Cause", 1)[-1]
    rank, status = re.search(r"rank\s*:\s*(\d+)", root), re.search(r"exitcode\s*:\s*(-?\d+)", root)
    if rank is not None and (errors / f"rank{rank[1]}").is_file():
        return (errors / f"rank{rank[1]}").read_text().strip()
    if rank is not None and status is not None:
        signal = f" (signal {-int(status[1])})" if int(status[1]) < 0 else ""
        return f"rank {rank[1]} exited with code {status[1]}{signal} before it could report an error"
    reported = sorted(errors.glob("rank*"), key=lambda f: f.stat().st_mtime)
    return reported[0].read_text().strip() if reported else f"torchrun exited with status {code}"


def _run_rank(args: argparse.Namespace) -> int:
    """One rank under torchrun: train, and turn any failure into one line (here and for `_launch`)."""
    import traceback

    from dapeng.errors import DapengError
    from dapeng.train import distributed

    try:
        return _train(args, resume=args.resume or _restarted_with_checkpoint(args))
    except DapengError as err:
        message, code = str(err), 2
        if args.debug:
            traceback.print_exc()
    except Exception as err:  # a rank's crash, or a collective that lost its peers
        message, code = f"{type(err).__name__}: {err}".splitlines()[0], 1
        if args.debug:
            traceback.print_exc()
    line = f"rank {distributed.world().rank}: {message}"
    print(f"dapeng train: error: {line}", file=sys.stderr)
    if ERROR_DIR in os.environ:
        Path(os.environ[ERROR_DIR], f"rank{distributed.world().rank}").write_text(line + "\n")
    return code


def _restarted_with_checkpoint(args: argparse.Namespace) -> bool:
    """After torchrun restarts the processes (`--max-restarts`), continue from the last checkpoint."""
    from dapeng.train import distributed
    from dapeng.train.trainer import checkpoint_exists

    out = args.out or Path("runs") / args.config.stem
    return distributed.restarted() and checkpoint_exists(out / "checkpoints")


def _train(args: argparse.Namespace, resume: bool | None = None) -> int:
    from dapeng.config import load_config
    from dapeng.runner import train
    from dapeng.train import distributed

    cfg = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / args.config.stem
    result = train(cfg, out, resume=args.resume if resume is None else resume, progress=not args.json)
    if not distributed.world().is_main:
        return 0
    if args.json:
        print(json.dumps(result))
        return 0
    metrics = result["metrics"]
    print(f"trained {cfg.model.name} on {cfg.task} for {result['steps']} steps"
          + (f" ({result['stopped']})" if result["stopped"] else ""))
    for split in ("eval", "test"):
        if metrics[split]:
            print(f"  {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics[split].items()))
    print(f"run directory: {out}  (report: {out / 'metrics.json'}, curves: {out / 'curves.png'}, "
          f"model: {result['model']}, TensorBoard: tensorboard --logdir {out / 'tb'})")
    return 0
