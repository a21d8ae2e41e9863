"""`dapeng distill CONFIG --teacher RUN --out RUN [--alpha A] [--temperature T] [--loss kl|mse] [--set ...]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dapeng.cli.train import add_run_arguments

EXAMPLE = """example:
  dapeng train examples/rotten-tomatoes-minilm.yaml --out runs/rt-minilm          # the teacher
  dapeng distill examples/rotten-tomatoes-bilstm.yaml --teacher runs/rt-minilm --out runs/rt-bilstm-distilled
  dapeng distill examples/rotten-tomatoes-cnn.yaml --teacher runs/rt-minilm --alpha 0.9 --temperature 4"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill",
        help="train a (smaller) student model from a config, learning from a trained teacher",
        description="Knowledge distillation: train the model a YAML run config describes, with a loss "
        "that mixes the labels and the softened predictions of a trained teacher classifier (a run "
        "directory, an Artifact folder or a hub name; it keeps its own tokenizer). The same as "
        "`dapeng train` with a `distill:` section in the config; the run directory is the same too, "
        "and the saved student needs no teacher to run.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, help="YAML run config of the student (task, data, model, train)")
    p.add_argument("--teacher", default=None, help="the teacher (default: the config's distill.teacher)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the teacher's soft targets (default 0.5)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (default 2)")
    p.add_argument("--loss", choices=["kl", "mse"], default=None, help="soft-target loss (default kl)")
    add_run_arguments(p, "runs/<config name>-distilled")
    return p


def run(args: argparse.Namespace) -> int:
    from dapeng.config import load_config, validate_config
    from dapeng.errors import ConfigError
    from dapeng.runner import train

    cfg = load_config(args.config, args.overrides)
    given = {"teacher": args.teacher, "alpha": args.alpha, "temperature": args.temperature, "loss": args.loss}
    spec = {**(cfg.distill.model_dump() if cfg.distill else {}), **{k: v for k, v in given.items() if v is not None}}
    if "teacher" not in spec:
        raise ConfigError("no teacher to distil from", "pass --teacher RUN (a run directory, Artifact folder or hub name)")
    cfg = validate_config({**cfg.model_dump(mode="json"), "distill": spec})
    out = args.out or Path("runs") / f"{args.config.stem}-distilled"
    result = train(cfg, out, resume=args.resume, progress=not args.json)
    if args.json:
        print(json.dumps(result))
        return 0
    metrics = result["metrics"]
    teacher = metrics["train"].get("teacher_eval_accuracy")
    print(f"distilled {cfg.model.name} from {cfg.distill.teacher} for {result['steps']} steps"
          + (f" (teacher eval accuracy {teacher:.4f})" if teacher is not None else ""))
    for split in ("eval", "test"):
        if metrics[split]:
            print(f"  {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics[split].items()))
    print(f"run directory: {out}  (report: {out / 'metrics.json'}, model: {result['model']})")
    return 0
