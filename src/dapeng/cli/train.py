"""`dapeng train CONFIG --out RUN [--set a.b=c ...] [--resume] [--json]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLE = """example:
  dapeng train examples/fashion-mnist-cnn.yaml --out runs/fm
  dapeng train examples/fashion-mnist-cnn.yaml --out runs/fm --set train.epochs=1 --set train.precision=fp32
  dapeng train examples/fashion-mnist-cnn.yaml --out runs/fm --resume     # continue a killed run exactly"""


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
    return p


def add_run_arguments(p: argparse.ArgumentParser, default_out: str) -> None:
    """--out, --set, --resume and --json: what every verb that writes a run directory takes."""
    p.add_argument("--out", type=Path, default=None, help=f"run directory (default: {default_out})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.optimizer.lr=3e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (no progress bar)")


def run(args: argparse.Namespace) -> int:
    from dapeng.config import load_config
    from dapeng.runner import train

    cfg = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / args.config.stem
    result = train(cfg, out, resume=args.resume, progress=not args.json)
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
