"""`dapeng predict RUN INPUT…` or `--file in.jsonl --out out.jsonl`: predictions from a trained model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dapeng.errors import DataError

EXAMPLE = """example:
  dapeng predict runs/rt "a gripping, funny film"          # label and score
  dapeng predict runs/fm shoe.png --json                   # images by path
  dapeng predict runs/rt --file reviews.jsonl --out predictions.jsonl

--file takes JSON lines (a string, or a record such as {"text": ...}) or plain text
(one input per line); each output line is the record plus its "prediction"."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="predict with a trained model (a run, an Artifact folder or a hub name)",
        description="Load a model and predict for inputs given on the command line or in a file.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="run directory, Artifact folder or hub name")
    p.add_argument("inputs", nargs="*", help="texts, or image paths for image models")
    p.add_argument("--file", type=Path, help="read inputs from a .jsonl or text file (one per line)")
    p.add_argument("--out", type=Path, help="write JSON lines here instead of printing")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="forward-pass precision (default: the one the model was trained in, else auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object per input")
    return p


def read_inputs(path: Path) -> Iterator[Any]:
    """Inputs from `path`: JSON lines for .jsonl/.json, else one text per line (blank lines skipped)."""
    if not path.is_file():
        raise DataError(f"input file {str(path)!r} not found")
    as_json = path.suffix in (".jsonl", ".json", ".ndjson")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if not as_json:
                yield line
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})", "one JSON value per line") from None


def run(args: argparse.Namespace) -> int:
    import dapeng
    from dapeng.pipeline import to_json

    if args.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, not {args.batch_size}")
    inputs = list(args.inputs)
    if args.file is not None:
        inputs += list(read_inputs(args.file))
    if not inputs:
        raise DataError("nothing to predict", "give inputs on the command line or --file FILE")
    pipe = dapeng.load(args.model, precision=args.precision)
    outputs = to_json(pipe.predict(inputs, batch_size=args.batch_size))
    rows = [_row(x, y, pipe.input_field) for x, y in zip(inputs, outputs)]
    if args.out is not None:
        _write_lines(args.out, rows)
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    elif args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        for x, y in zip(inputs, outputs):
            print(f"{_summary(y)}\t{_short(x)}")
    return 0


def _row(raw: Any, prediction: Any, field: str) -> dict[str, Any]:
    record = dict(raw) if isinstance(raw, dict) else {field: raw}
    return {**record, "prediction": prediction}


def _summary(prediction: Any) -> str:
    if isinstance(prediction, dict) and "label" in prediction:
        score = prediction.get("score")
        return f"{prediction['label']} ({score:.3f})" if isinstance(score, float) else str(prediction["label"])
    return json.dumps(prediction)


def _short(raw: Any, width: int = 70) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw)
    return text if len(text) <= width else text[: width - 1] + "…"


def _write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write JSON lines atomically: a temp file beside `path`, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
