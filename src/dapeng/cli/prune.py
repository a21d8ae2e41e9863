"""`dapeng prune RUN --sparsity 0.5 --unstructured|--structured [--finetune-epochs N] --out DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLE = """example:
  dapeng prune runs/rt-bilstm --sparsity 0.5 --unstructured --finetune-epochs 1
  dapeng prune runs/fm --sparsity 0.3 --structured --finetune-epochs 2 --out runs/fm/model-pruned --json

Fine-tuning uses the run's own train: settings (optimizer, learning rate, batch size) for
--finetune-epochs epochs, with the pruned weights held at zero; the saved Artifact is the
plain architecture with the zeros made permanent."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prune",
        help="magnitude-prune a run's model, then fine-tune it to recover",
        description="Magnitude pruning (torch.nn.utils.prune) of RUN/model's Linear, Conv and recurrent "
        "weights, recovery fine-tuning through the Trainer, and an Artifact of the result.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, help="run directory written by `dapeng train`")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of each weight to zero (0.5)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--unstructured", dest="structured", action="store_false", default=False,
                      help="single weights by magnitude (L1; the default)")
    kind.add_argument("--structured", dest="structured", action="store_true",
                      help="whole output rows/filters by L2 norm")
    p.add_argument("--finetune-epochs", type=int, default=1, help="recovery fine-tuning epochs (1; 0: none)")
    p.add_argument("--out", type=Path, default=None, help="Artifact folder (default: RUN/model-pruned)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    from dapeng.cli._runs import encoded, load_run
    from dapeng.compress.prune import prune_artifact
    from dapeng.errors import ConfigError
    from dapeng.runner import trainer_kwargs

    if args.finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs {args.finetune_epochs} is negative", "use 0 for no fine-tuning")
    loaded = load_run(args.run)
    out = args.out or args.run / "model-pruned"
    train_items = encoded(loaded, "train") if args.finetune_epochs else []
    kwargs = {k: v for k, v in trainer_kwargs(loaded.config.train).items()
              if k not in ("checkpoint_every", "eval_every", "max_steps", "early_stopping", "compile")}
    result = prune_artifact(loaded.artifact, args.sparsity, out, structured=args.structured,
                            train_items=train_items, eval_items=encoded(loaded, "eval"),
                            finetune_epochs=args.finetune_epochs, trainer_kwargs=kwargs)
    if args.json:
        print(json.dumps(result))
        return 0
    acc = result["accuracy"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"pruned {args.sparsity:.0%} {'structured' if args.structured else 'unstructured'}: sparsity "
          f"{result['sparsity']['pruned_weights']:.2%} of the pruned weights, {result['sparsity']['all_parameters']:.2%} "
          f"of all; eval accuracy {fmt(acc['before'])} → {fmt(acc['pruned'])} pruned → {fmt(acc['finetuned'])} "
          f"fine-tuned; {result['size_mb']:.2f} MB (dense); model: {out}")
    return 0
