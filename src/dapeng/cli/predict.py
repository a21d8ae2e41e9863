"""`dapeng predict RUN INPUT…` or `--file rows.csv --out out.jsonl`: predictions from a trained model."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from dapeng.errors import DapengError, DataError

EXAMPLE = """example:
  dapeng predict runs/rt "a gripping, funny film"                  # label and score
  dapeng predict runs/rt --json "a gripping, funny film"           # options go anywhere
  dapeng predict runs/fm shoe.png --json                           # images by path
  dapeng predict runs/vqa --image shape.png "what color is the shape?" "is there a circle?"
  dapeng predict runs/rt --file reviews.csv --out predictions.jsonl
  dapeng predict runs/rt --file reviews.tsv --text-column review --on-error fail
  dapeng predict runs/qa --context story.txt "who wrote the letter?"   # question answering
  dapeng predict runs/qa '{"question": "who wrote it?", "context": "Ann wrote it."}'

--file reads CSV/TSV (with a header row), JSON lines (records, or bare strings) or plain
text (one input per line: .txt and any other suffix), gzipped or not, with the readers
training uses. The input column is the run's data.text_column (data.image_column for image
models, whose paths are relative to the file; both for image+text models such as visual
question answering); for an Artifact or hub name without a run directory, the task's input
field ("text" or "image"; "image" and "text" for image+text). On the command line, an image+text
model takes --image FILE and each input is a question (a text) about that image. A
question-answering model reads each row's "question" and "context" fields (JSONL or CSV
columns of those names), and on the command line asks each question of --context.

Each output is one JSON line {"line": N, <the row's columns>, "prediction": ...}, where N
is the file line the row starts on: a CSV's header is line 1, so its first row is line 2.
A bad row (a missing or empty column, bytes that are not UTF-8, malformed CSV or JSON,
over --max-chars, an unreadable image) is reported on stderr as FILE:LINE: reason.
--on-error skip (the default: one broken line shouldn't cost the predictions of a whole
file) predicts the other rows and exits 0; --on-error fail stops at the first bad row with
exit 2, and --out is then not written."""

_FILE_FORMATS = ("csv", "jsonl", "text")


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
    p.add_argument("--context", help="question answering: the context (a file to read, or the text itself) "
                   "every question on the command line is asked of")
    p.add_argument("--image", type=Path, help="image+text models: the image the inputs (questions) are about")
    p.add_argument("--file", type=Path, help="read inputs from a CSV/TSV, JSONL or text file (one row per input)")
    p.add_argument("--format", choices=_FILE_FORMATS, help="the --file format (default: by its suffix; else text)")
    p.add_argument("--text-column", help="column of the input text (default: the run's data.text_column)")
    p.add_argument("--image-column", help="column of image paths (default: the run's data.image_column)")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="a bad --file row is reported and skipped (default), or stops the run (exit 2)")
    p.add_argument("--max-chars", type=int, default=100_000, help="longest input text; longer rows are bad rows")
    p.add_argument("--out", type=Path, help="write JSON lines here (atomically) instead of printing")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="forward-pass precision (default: the one the model was trained in, else auto)")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="run the forward pass in PyTorch or ONNX Runtime (a run's `dapeng export` folder); "
                        "auto: ONNX Runtime for export folders")
    p.add_argument("--json", action="store_true", help="print one JSON object per input")
    return p


class _Item(NamedTuple):
    """One input: the file line it starts on (None on the command line), what its output shows, its record."""

    line: int | None
    values: dict[str, Any]
    shown: Any
    record: dict[str, Any]


def run(args: argparse.Namespace) -> int:
    from dapeng.pipeline import load

    if args.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.max_chars < 1:
        raise DataError(f"--max-chars must be at least 1, not {args.max_chars}")
    if not args.inputs and args.file is None:
        raise DataError("nothing to predict", "give inputs on the command line or --file FILE")
    if args.file is not None:
        _check_file(args.file)
    pipe = load(args.model, precision=args.precision, backend=args.backend)
    bad = _BadRows(args.file, args.on_error)
    items = itertools.chain(_command_line_items(pipe, args.inputs, args.context, args.image),
                            _file_items(pipe, args, bad.report))
    if args.out is not None:
        from dapeng._files import atomic_path

        with atomic_path(args.out) as tmp, tmp.open("w", encoding="utf-8") as out:
            count = _predict(pipe, items, args.batch_size, lambda item, p: out.write(json.dumps(_row(item, p)) + "\n"))
            _check_some(count, bad)
        print(f"wrote {_plural(count, 'prediction')} to {args.out}{bad.summary()}", file=sys.stderr)
        return 0
    if args.json:
        count = _predict(pipe, items, args.batch_size, lambda item, p: print(json.dumps(_row(item, p))))
    else:
        count = _predict(pipe, items, args.batch_size, lambda item, p: print(_text_line(args.file, item, p)))
    _check_some(count, bad)
    if bad.count:
        print(f"dapeng predict: {_plural(count, 'prediction')}{bad.summary()}", file=sys.stderr)
    return 0


def _check_file(path: Path) -> None:
    """Fail before the model loads: a missing input file is the user's first mistake to hear about."""
    if path.is_dir():
        raise DataError(f"--file {path} is a folder", "pass a CSV/TSV, JSONL or text file")
    if not path.is_file():
        raise DataError(f"input file {str(path)!r} not found", "check the path")


def _file_format(path: Path, chosen: str | None) -> str:
    from dapeng.data.readers import infer_format

    if chosen is not None:
        return chosen
    try:
        fmt = infer_format(path)
    except DataError:
        return "text"  # any other suffix: one input per line, as before there were readers
    if fmt not in _FILE_FORMATS:
        raise DataError(f"{path}: predict reads CSV/TSV, JSONL or text files, not {fmt}",
                        f"pass --format ({', '.join(_FILE_FORMATS)})")
    return fmt


class _BadRows:
    """Bad --file rows: each reported on stderr, then skipped or fatal."""

    def __init__(self, path: Path | None, on_error: str) -> None:
        self.path = path
        self.on_error = on_error
        self.count = 0

    def report(self, line: int, reason: str) -> None:
        if self.on_error == "fail":
            raise DataError(f"{self.path}:{line}: {reason}",
                            "fix the row, or pass --on-error skip to predict the other rows")
        self.count += 1
        print(f"dapeng predict: {self.path}:{line}: {reason} (skipped)", file=sys.stderr)

    def summary(self) -> str:
        return f" ({_plural(self.count, 'bad row')} of {self.path} skipped)" if self.count else ""


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _check_some(count: int, bad: _BadRows) -> None:
    if count == 0 and bad.count:
        raise DataError(f"no row of {bad.path} could be read ({_plural(bad.count, 'bad row')}, reported above)",
                        "--text-column or --image-column names the input column")


def _command_line_items(pipe: Any, inputs: list[str], context: str | None, image: Path | None) -> Iterator[_Item]:
    field = pipe.input_field
    if field == "image+text":
        if inputs and image is None:
            raise DataError(f"model {pipe.name!r} answers questions about an image: --image is missing",
                            'dapeng predict RUN --image FILE "question"')
        raws: list[Any] = [{"image": str(image), "text": text} for text in inputs]
        for record, raw, shown in zip(pipe.to_records(raws), raws, inputs):
            yield _Item(None, raw, shown, record)
        return
    if image is not None:
        raise DataError(f"--image is for image+text models; {pipe.name!r} reads {field} inputs",
                        "pass its inputs as arguments")
    fields = pipe.capabilities.fields
    if len(fields) == 1:
        if context is not None:
            raise DataError(f"--context is for question answering; this model's task reads {field!r} inputs",
                            "drop --context")
        for record, raw in zip(pipe.to_records(inputs), inputs):
            yield _Item(None, {field: raw}, raw, record)
        return
    questions = [_question_record(raw, fields, context) for raw in inputs]
    for record, raw, shown in zip(pipe.to_records(questions), questions, inputs):
        yield _Item(None, {f: raw[f] for f in fields}, shown, record)


def _question_record(raw: str, fields: tuple[str, ...], context: str | None) -> dict[str, Any]:
    """A command-line input of a question-answering model: a JSON record, or a question asked of --context."""
    if raw.lstrip().startswith("{"):
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"input {_short(raw, 40)!r} is not a JSON record: {err.msg}") from None
        if isinstance(record, dict):
            return record
    if context is None or "context" not in fields:
        shape = ", ".join(f'"{f}": ...' for f in fields)
        raise DataError(f"a question needs a context: this model reads {', '.join(fields)}",
                        f'pass --context FILE_OR_TEXT, or a JSON record {{{shape}}}')
    path = Path(context)
    text = path.read_text(encoding="utf-8") if len(context) < 4096 and path.is_file() else context
    return {fields[0]: raw, "context": text}


def _file_items(pipe: Any, args: argparse.Namespace, report: Callable[[int, str], None]) -> Iterator[_Item]:
    """The --file rows the model can take; each bad one goes to `report` instead."""
    if args.file is None:
        return
    from dapeng.data.readers import iter_rows

    field = pipe.input_field
    fields = pipe.capabilities.fields
    if len(fields) > 1 and field != "image+text":
        yield from _record_items(pipe, args, fields, report)
        return
    defaults = _run_columns(args.model)
    image_column = args.image_column or defaults.get("image", "image")
    text_column = args.text_column or defaults.get("text", "text")
    if field == "image":
        columns = {args.image_column or defaults.get("image", field): "--image-column"}
    elif field == "image+text":
        columns = {image_column: "--image-column", text_column: "--text-column"}
    else:
        columns = {args.text_column or defaults.get("text", field): "--text-column"}
    for row in iter_rows(args.file, _file_format(args.file, args.format), columns):
        if row.error is not None:
            report(row.line, row.error)
            continue
        try:
            if field == "image":
                (column,) = columns
                value = row.values[column]
                record = _image_record(pipe, value, column, args.file)
            elif field == "image+text":
                value = row.values[text_column]
                image = _image_record(None, row.values[image_column], image_column, args.file)
                text = _text_record(None, value, text_column, args.max_chars)
                record = pipe.to_records([{"image": image, "text": text}])[0]
            else:
                (column,) = columns
                value = row.values[column]
                record = _text_record(pipe, value, column, args.max_chars)
        except DapengError as err:
            report(row.line, err.message)
            continue
        yield _Item(row.line, row.values, value, record)


def _record_items(pipe: Any, args: argparse.Namespace, fields: tuple[str, ...],
                  report: Callable[[int, str], None]) -> Iterator[_Item]:
    """--file rows of a model whose input is a record of several strings (question and context)."""
    from dapeng.data.readers import iter_rows

    for row in iter_rows(args.file, _file_format(args.file, args.format), {f: f"a {f!r} field" for f in fields}):
        if row.error is not None:
            report(row.line, row.error)
            continue
        values = {f: row.values[f] for f in fields}
        try:
            for f in fields:
                _text_record(None, values[f], f, args.max_chars)
            record = pipe.to_records([values])[0]
        except DapengError as err:
            report(row.line, err.message)
            continue
        yield _Item(row.line, row.values, values[fields[0]], record)


def _text_record(pipe: Any, value: Any, column: str, max_chars: int) -> Any:
    """The pipeline's record of a text cell (the checked text itself with `pipe` None)."""
    if not isinstance(value, str):
        raise DataError(f"{column!r} must be a string, not {type(value).__name__}")
    if len(value) > max_chars:
        raise DataError(f"{column!r} has {len(value)} characters, over --max-chars {max_chars}")
    return value if pipe is None else pipe.to_records([value])[0]


def _image_record(pipe: Any, value: Any, column: str, source: Path) -> Any:
    """The pipeline's record of an image-path cell (the pixels themselves with `pipe` None)."""
    from dapeng.data.readers import load_image

    if not isinstance(value, str):
        raise DataError(f"{column!r} must be an image path, not {type(value).__name__}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = source.parent / path  # paths in a data file are relative to the file, as in training data
    if not path.is_file():
        raise DataError(f"no image file {path}")
    pixels = load_image(path)
    return pixels if pipe is None else pipe.to_records([pixels])[0]


def _run_columns(source: str) -> dict[str, str]:
    """The input columns of the run `source` belongs to: {"text": ..., "image": ...}; {} without a run.

    Only the config's data section is read (not `runner.load_run_config`): predicting must
    not need the training files to still be where they were.
    """
    import yaml
    from pydantic import ValidationError

    from dapeng.config import DataConfig
    from dapeng.errors import ConfigError
    from dapeng.runner import CONFIG

    path = Path(source)
    runs = [path, path.parent] if (path / "dapeng.json").is_file() else [path]
    for run in runs:
        config = run / CONFIG
        if config.is_file():
            try:
                raw = yaml.safe_load(config.read_text())
                data = DataConfig.model_validate((raw or {}).get("data") or {})
            except (yaml.YAMLError, ValidationError, AttributeError):
                raise ConfigError(f"{config}: not a valid run config",
                                  "pass --text-column/--image-column, or the Artifact folder") from None
            return {"text": data.text_column, "image": data.image_column}
    return {}


def _predict(pipe: Any, items: Iterator[_Item], batch_size: int, emit: Callable[[_Item, Any], Any]) -> int:
    """Predict in windows of rows, so a large file never sits in memory whole; returns the count."""
    from dapeng.pipeline import to_json

    count = 0
    while window := list(itertools.islice(items, 32 * batch_size)):
        outputs = to_json(pipe.predict_records([item.record for item in window], batch_size=batch_size))
        for item, prediction in zip(window, outputs):
            emit(item, prediction)
        count += len(window)
    return count


def _row(item: _Item, prediction: Any) -> dict[str, Any]:
    line = {"line": item.line} if item.line is not None else {}
    return {**line, **{k: v for k, v in item.values.items() if k != "line"}, "prediction": prediction}


def _text_line(source: Path | None, item: _Item, prediction: Any) -> str:
    where = f"{source}:{item.line}\t" if item.line is not None else ""
    return f"{where}{_summary(prediction)}\t{_short(item.shown)}"


def _summary(prediction: Any) -> str:
    if isinstance(prediction, dict) and "label" in prediction:
        score = prediction.get("score")
        return f"{prediction['label']} ({score:.3f})" if isinstance(score, float) else str(prediction["label"])
    if isinstance(prediction, dict) and "answer" in prediction:
        answer = json.dumps(prediction["answer"]) if prediction["answer"] else "(no answer)"
        score = prediction.get("score")
        return f"{answer} ({score:.3f})" if isinstance(score, float) else answer
    return json.dumps(prediction)


def _short(raw: Any, width: int = 70) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw)
    return text if len(text) <= width else text[: width - 1] + "…"

