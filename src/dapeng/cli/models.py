"""`dapeng models list | show NAME [--set k=v …] | graph NAME --out graph.svg|png [--tensorboard DIR]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLE = """example:
  dapeng models list
  dapeng models show resnet --set widths=[16,32,64]
  dapeng models show transformer --set hidden=384 --set heads=12 --set layers=6 --set intermediate=1536 --json
  dapeng models graph lm --set layers=2 --out lm.svg --tensorboard runs/graphs/lm"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models",
        help="list the registered models, summarise one, or draw its graph",
        description="Inspect the model zoo: `list` the registered architectures, `show` a Keras-style summary "
        "(layers, output shapes, parameters, FLOPs per image or token) for given constructor arguments, "
        "`graph` renders the module-level computation graph as SVG/PNG and/or writes it to TensorBoard.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    lst = sub.add_parser("list", help="the registered model names")
    lst.add_argument("--json", action="store_true", help="print a JSON list")
    for action, text in (("show", "a Keras-style summary of one model"), ("graph", "draw a model's computation graph")):
        q = sub.add_parser(action, help=text)
        q.add_argument("name", help="a registered model name (see `dapeng models list`)")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="a constructor argument, e.g. --set hidden=128 (repeatable; YAML values)")
        q.add_argument("--depth", type=int, default=3 if action == "show" else 2,
                       help="how deep into nested modules to list/draw")
        q.add_argument("--seq-len", type=int, default=128 if action == "show" else 16,
                       help="example sequence length for text models")
    show = sub.choices["show"]
    show.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    graph = sub.choices["graph"]
    graph.add_argument("--out", type=Path, default=None, help="image to write: .svg or .png")
    graph.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                       help="also write the traced graph to this TensorBoard log directory")
    return p


def _kwargs(overrides: list[str]) -> dict:
    from dapeng.config import parse_value
    from dapeng.errors import ConfigError

    kwargs = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form key=value", "e.g. --set hidden=128")
        kwargs[key.strip()] = parse_value(text)
    return kwargs


def run(args: argparse.Namespace) -> int:
    from dapeng.errors import ConfigError
    from dapeng.models import MODELS

    if args.action == "list":
        names = MODELS.names()
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    from dapeng.models.introspect import (
        build,
        check_image_path,
        export_tensorboard,
        module_graph,
        render_graph,
        summarize,
    )

    if getattr(args, "out", None) is not None:
        check_image_path(args.out)
    model = build(args.name, _kwargs(args.overrides))
    if args.action == "show":
        summary = summarize(model, args.name, depth=args.depth, seq_len=args.seq_len)
        print(json.dumps(summary.as_dict()) if args.json else summary.render())
        return 0
    if args.out is None and args.tensorboard is None:
        raise ConfigError("nothing to write", "give --out graph.svg|png and/or --tensorboard DIR")
    if args.out is not None:
        nodes, edges = module_graph(model, depth=args.depth, seq_len=args.seq_len)
        render_graph(nodes, edges, args.out, f"{args.name}: {type(model).__name__}")
        print(f"wrote {args.out} ({len(nodes)} nodes, {len(edges)} edges)")
    if args.tensorboard is not None:
        export_tensorboard(model, args.tensorboard, seq_len=args.seq_len)
        print(f"wrote the graph to {args.tensorboard} (tensorboard --logdir {args.tensorboard})")
    return 0
