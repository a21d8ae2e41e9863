"""`dapeng eval RUN [--split test] [--json]`: evaluate a trained run's model on a split of its data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLE = """example:
  dapeng eval runs/fm                  # test split
  dapeng eval runs/fm --split eval --json"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a run's model on its test (or eval/train) split",
        description="Load RUN/model and evaluate it on a split of the data in RUN/config.yaml.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, help="run directory written by `dapeng train`")
    p.add_argument("--split", choices=("test", "eval", "train"), default="test", help="which split (default: test)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="forward-pass precision (default: the one the run was trained in)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    from dapeng.runner import evaluate

    report = evaluate(args.run, split=args.split, precision=args.precision)
    metrics = report["metrics"]
    if args.json:
        print(json.dumps({"run": str(args.run), "split": args.split, "precision": report["precision"],
                          "metrics": metrics}))
    else:
        print(f"{args.run} on {args.split} ({report['precision']}): "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0
