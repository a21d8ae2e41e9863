"""`dapeng` command line: one verb per stage, each a thin shell over the Python API.

Each verb lives in `dapeng/cli/<verb>.py` and exposes
`add_parser(subparsers) -> argparse.ArgumentParser` and `run(args) -> int`.
Verb modules import torch only inside `run`, so `dapeng --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dapeng import __version__

# verb name -> module under dapeng.cli (one explicit list, in the order of the life cycle)
VERBS = {
    "train": "train",
    "eval": "evaluate",
    "predict": "predict",
    "explain": "explain",
    "quantize": "quantize",
    "prune": "prune",
    "distill": "distill",
    "export": "export",
    "serve": "serve",
    "generate": "generate",
    "embed": "embed",
    "topics": "topics",
    "hub": "hub",
    "data": "data",
    "models": "models",
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose options may come before, between or after the positionals.

    Plain argparse hands a `nargs="*"` positional an empty list as soon as an option follows
    the first positional, so `dapeng predict RUN --json "text"` failed on "text"; intermixed
    parsing reads the options first and then all positionals. argparse can't intermix a
    parser that has sub-commands, so those parse as usual and pass the rest to the
    sub-command's parser (a `_Parser` too: `add_subparsers` builds them of the parser's class).
    """

    _intermixing = False

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._subparsers is not None or self._intermixing:
            return super().parse_known_args(args, namespace)
        # parse_known_intermixed_args calls parse_known_args twice itself: those calls parse plainly.
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dapeng",
        description="Build, train, fine-tune, explain, compress and serve deep neural networks.",
        epilog="Run `dapeng VERB --help` for an example of each verb.",
    )
    parser.add_argument("--version", action="version", version=f"dapeng {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for module in VERBS.values():
        p = importlib.import_module(f"dapeng.cli.{module}").add_parser(sub)
        p.set_defaults(_module=f"dapeng.cli.{module}")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 0
    from dapeng.errors import DapengError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except DapengError as err:
        if args.debug:
            raise
        print(f"dapeng {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dapeng {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
