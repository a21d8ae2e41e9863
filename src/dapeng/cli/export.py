"""`dapeng export RUN --format onnx|torch --out DIR`: an ONNX model or `torch.export` program, checked on real inputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLE = """example:
  dapeng export runs/rt-bilstm --format onnx --out exports/rt-bilstm-onnx
  dapeng export runs/fm --format torch --out exports/fm-pt2 --json

OUT holds model.onnx (or model.pt2), export.json (exporter, opset, dynamic axes, the check)
and the Artifact's dapeng.json and tokenizer.json. The export is run on real inputs from
the run's eval split (batches of other sizes and lengths than the traced one) and compared
with PyTorch; above --tolerance max abs difference nothing is written (exit 2)."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a run's model to ONNX or a torch.export program, checked against PyTorch",
        description="Export RUN/model with dynamic batch (and sequence) axes and check it on real inputs.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, help="run directory written by `dapeng train`")
    p.add_argument("--format", choices=("onnx", "torch"), default="onnx", help="onnx (default) or torch (.pt2)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/export-FORMAT)")
    p.add_argument("--split", choices=("eval", "test", "train"), default="eval", help="real inputs from (default eval)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest max abs difference of the logits (1e-4)")
    p.add_argument("--json", action="store_true", help="print export.json")
    return p


def run(args: argparse.Namespace) -> int:
    from dapeng.cli._runs import encoded, load_run
    from dapeng.compress.export import export

    loaded = load_run(args.run)
    out = args.out or args.run / f"export-{args.format}"
    items = encoded(loaded, args.split, limit=37)
    report = export(loaded.artifact.model, loaded.artifact.task, items, out, args.format,
                    artifact_dir=loaded.artifact.path, tolerance=args.tolerance)
    if args.json:
        print(json.dumps({**report, "out": str(out)}))
        return 0
    check = report["checked"]
    print(f"exported {loaded.config.model.name} to {out / report['file']} with {report['exporter']}"
          + (f", opset {report['opset']}" if "opset" in report else "")
          + f"; max abs diff {check['max_abs_diff']:.2e} on {sum(check['batches'])} real inputs "
          f"(batches {check['batches']})")
    return 0
