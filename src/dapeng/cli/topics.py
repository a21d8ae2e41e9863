"""`dapeng topics RUN [--top N] [--doc TEXT]... [--json] [--plot OUT.png]`: what a topic model learned."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLE = """example:
  dapeng topics runs/sotu-prodlda                                  # each topic's top 10 words
  dapeng topics runs/sotu-prodlda --doc "We must cut taxes and balance the budget."   # its topic mix
  dapeng topics runs/sotu-prodlda --plot sotu-topics.png           # word bars + prevalence over the years
  dapeng topics runs/sotu-prodlda --json"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "topics",
        help="top words per topic, a document's topic mix, and pictures of both",
        description="Show a topic model's topics (each topic's heaviest words) and, with --doc, the topic mix "
        "of each given text. --plot draws topic-word bars and, for a run whose records have a 'year' "
        "(SOTU), the prevalence of each topic over the years.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="a topic-model run directory (or its Artifact folder)")
    p.add_argument("--top", type=int, default=10, help="words shown per topic (default 10)")
    p.add_argument("--doc", action="append", default=[], metavar="TEXT", help="a text to give the topic mix of")
    p.add_argument("--plot", type=Path, help="draw the topics (and prevalence over years) to this image")
    p.add_argument("--json", action="store_true", help='print {"topics": [...], "documents": [...]} as JSON')
    return p


def _prevalence(run: Path, pipe: object) -> tuple[list, object] | None:
    """Prevalence over the years of the run's own records, when it is a run directory whose records have years."""
    from dapeng.explain.topics import prevalence
    from dapeng.runner import load_run_config, load_splits

    if not (run / "config.yaml").is_file():
        return None
    splits = load_splits(load_run_config(run))
    records = [r for part in (splits.train, splits.eval, splits.test) for r in part or ()]
    if not records or any("year" not in r for r in records):
        return None
    return prevalence(pipe, records, key="year")


def run(args: argparse.Namespace) -> int:
    from dapeng.errors import DataError

    if args.top < 1:
        raise DataError(f"--top must be at least 1, not {args.top}")
    from dapeng.explain.topics import document_mixes, plot_topics, topic_table
    from dapeng.pipeline import load

    pipe = load(args.run, precision="fp32")
    topics = topic_table(pipe, args.top)
    documents = document_mixes(pipe, args.doc) if args.doc else []
    plotted = None
    if args.plot is not None:
        plotted = plot_topics(topics, args.plot, _prevalence(Path(args.run), pipe), title=f"topics of {pipe.name}")
    if args.json:
        print(json.dumps({"topics": topics, "documents": documents, "plot": str(plotted) if plotted else None}))
        return 0
    for t in topics:
        print(f"topic {t['topic']:3d}  {' '.join(t['words'])}")
    for d in documents:
        print(f"\n{d['text'][:70]!r}")
        for top in d["top"]:
            print(f"  {top['share']:6.1%}  topic {top['topic']:3d}  {' '.join(topics[top['topic']]['words'][:6])}")
    if plotted:
        print(f"\nwrote {plotted}")
    return 0
