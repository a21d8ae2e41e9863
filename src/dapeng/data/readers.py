"""Readers for users' own data: CSV/TSV, JSONL, image folders, IDX, CoNLL, plain text.

Every reader returns a list of *records* (plain dicts, see `dapeng.tasks.base`) and
raises a one-line DataError that names the file, the line and the column at fault.
Records from files carry `"_source": "path:line"` so later errors (an unknown label at
test time, say) can point back at the place.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dapeng.errors import DataError
from dapeng.records import Record

FORMATS = ("csv", "jsonl", "imagefolder", "idx", "conll", "squad", "text")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file", "check the path in the data section of the config")
    if path.is_dir():
        raise DataError(
            f"{path}: is a folder, expected a file", "set data.format: imagefolder for image folders"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty", "point the config at a file with records")


def _open_text(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8-sig", newline="")


def infer_format(path: Path) -> str:
    """The reader for `path` by its shape: a folder is an image folder, else by suffix."""
    if path.is_dir():
        return "imagefolder"
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "squad" if _looks_like_squad(path) else "jsonl"
    if "-ubyte" in name or name.endswith(".idx") or "idx1" in name or "idx3" in name:
        return "idx"
    if name.endswith((".conll", ".conllu", ".bio", ".iob")):
        return "conll"
    if name.endswith(".txt"):
        return "text"
    if not path.exists():
        raise DataError(f"{path}: no such file", "check the path in the data section of the config")
    raise DataError(
        f"{path}: cannot tell the format from the name", f"set data.format to one of: {', '.join(FORMATS)}"
    )


def _missing_column(path: Path, what: str, column: str, found: list[str], key: str) -> DataError:
    return DataError(
        f"{path}: no {what} column {column!r}; columns found: {', '.join(map(repr, found))}",
        f"set data.{key} to one of them",
    )


def read_csv(
    path: Path | str,
    text_column: str = "text",
    label_column: str = "label",
    require_label: bool = True,
    delimiter: str | None = None,
) -> list[Record]:
    """Read a CSV/TSV file with a header row into `{"text", "label", <other columns>}` records.

    Args:
        path: the file (.csv, .tsv, optionally .gz).
        text_column: header name of the input text, stored as "text".
        label_column: header name of the label, stored as "label" (as a string).
        require_label: when False the label column may be absent (inputs for prediction).
        delimiter: defaults to a tab for .tsv files and a comma otherwise.
    """
    path = Path(path)
    _check_file(path)
    if delimiter is None:
        delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    records: list[Record] = []
    try:
        with _open_text(path) as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(f"{path}: file is empty", "the first line must name the columns")
            header = [h.strip() for h in header]
            if text_column not in header:
                raise _missing_column(path, "text", text_column, header, "text_column")
            has_label = label_column in header
            if require_label and not has_label:
                raise _missing_column(path, "label", label_column, header, "label_column")
            t_ix = header.index(text_column)
            l_ix = header.index(label_column) if has_label else -1
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != len(header):
                    raise DataError(
                        f"{path}:{line}: row has {len(row)} fields, the header has {len(header)}",
                        "quote fields that contain the delimiter",
                    )
                record: Record = {h: v for h, v in zip(header, row) if h not in (text_column, label_column)}
                record["text"] = row[t_ix]
                if has_label:
                    label = row[l_ix].strip()
                    if not label:
                        raise DataError(
                            f"{path}:{line}: empty label in column {l_ix + 1} ({label_column!r})",
                            "every training row needs a label",
                        )
                    record["label"] = label
                record["_source"] = f"{path}:{line}"
                records.append(record)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})", "save the file as UTF-8") from None
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV: {err}") from None
    if not records:
        raise DataError(f"{path}: no data rows after the header", "add records, one per line")
    return records


def read_jsonl(
    path: Path | str,
    text_column: str = "text",
    label_column: str = "label",
    require_label: bool = True,
    image_column: str = "image",
) -> list[Record]:
    """Read one JSON object per line; `text_column`/`label_column` keys become "text"/"label".

    Other keys are kept as they are, so JSONL also carries records of other tasks:
    a record with "tokens" (`{"tokens": [...], "tags": [...]}`) needs no text or label.
    A string under `image_column` is an image file's path, relative to the JSONL file's
    folder: it is read into "image" (uint8 (H, W[, C])), for image+text tasks
    (`{"image": "img/1.png", "text": "what color is the shape?", "label": "red"}`).
    """
    path = Path(path)
    _check_file(path)
    records: list[Record] = []
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}:{line_no}: invalid JSON at column {err.colno}: {err.msg}"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
                # a tagging or question-answering record: no text/label columns to map
                tagged = "tokens" in obj or "question" in obj
                if "tokens" in obj:
                    _check_tagged(obj, f"{path}:{line_no}", require_label)
                found = ", ".join(map(repr, obj))
                if text_column in obj:
                    obj["text"] = obj.pop(text_column)
                elif require_label and not tagged:
                    raise DataError(
                        f"{path}:{line_no}: no key {text_column!r}; keys found: {found}",
                        "set data.text_column to one of them",
                    )
                if label_column in obj:
                    label = obj.pop(label_column)
                    obj["label"] = label if isinstance(label, list) else str(label)
                elif require_label and not tagged:
                    raise DataError(
                        f"{path}:{line_no}: no key {label_column!r}; keys found: {found}",
                        "set data.label_column to one of them",
                    )
                if isinstance(obj.get(image_column), str):
                    obj["image"] = _image_at(path, line_no, obj.pop(image_column))
                obj["_source"] = f"{path}:{line_no}"
                records.append(obj)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})", "save the file as UTF-8") from None
    if not records:
        raise DataError(f"{path}: no records (only blank lines)", "add one JSON object per line")
    return records


def _image_at(path: Path, line_no: int, relative: str) -> np.ndarray:
    """The image a JSONL line names, read relative to the JSONL file's folder."""
    image = path.parent / relative
    if not image.is_file():
        raise DataError(f"{path}:{line_no}: image {relative!r} not found (looked for {image})",
                        "image paths are relative to the JSONL file's folder")
    return load_image(image)


def _check_tagged(obj: dict[str, Any], where: str, require_label: bool) -> None:
    """A `{"tokens": [...], "tags": [...]}` record: lists of non-empty strings, one tag per token."""
    tokens = obj["tokens"]
    shape = 'one JSON object per line: {"tokens": ["John", "runs"], "tags": ["B-PER", "O"]}'
    if not isinstance(tokens, list) or not tokens:
        got = f"a {type(tokens).__name__}" if tokens else "an empty list"
        raise DataError(f"{where}: \"tokens\" must be a non-empty list of strings, got {got}", shape)
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token:
            raise DataError(f"{where}: token {i} is {json.dumps(token)}, not a non-empty string", shape)
    if "tags" not in obj:
        if require_label:
            raise DataError(f"{where}: no \"tags\" for the {len(tokens)} tokens", shape)
        return
    tags = obj["tags"]
    if not isinstance(tags, list) or len(tags) != len(tokens):
        got = f"{len(tags)} tags" if isinstance(tags, list) else f"a {type(tags).__name__}"
        raise DataError(f"{where}: {len(tokens)} tokens but {got}", "give each token exactly one tag")
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not tag.strip():
            raise DataError(
                f"{where}: tag {i} (of token {tokens[i]!r}) is {json.dumps(tag)}, not a tag", shape
            )


def load_image(path: Path | str) -> np.ndarray:
    """An image file as uint8 (H, W) for grey or (H, W, 3) for colour; DataError if it is not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "RGB"):
                im = im.convert("L" if im.mode in ("1", "I", "I;16", "F") else "RGB")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        reason = "not an image" if isinstance(err, UnidentifiedImageError) else f"unreadable image ({err})"
        raise DataError(
            f"{path}: {reason}", "remove it from the image folder, or convert it to PNG/JPEG"
        ) from None


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def read_image_folder(path: Path | str, require_label: bool = True) -> list[Record]:
    """Read `root/<class>/<image>` into `{"image": uint8 array, "label": class}` records.

    With `require_label=False` a folder of loose images is also accepted (inputs to predict).
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such folder", "check the path in the data section of the config")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder", "an image folder holds one subfolder of images per class")
    entries = _visible(root)
    loose = [p for p in entries if p.is_file()]
    classes = [p for p in entries if p.is_dir()]
    if not require_label and loose and not classes:
        return [{"image": load_image(p), "_source": str(p)} for p in loose]
    if loose:
        raise DataError(f"{loose[0]}: file outside a class subfolder", "put each image in root/<class>/")
    if not classes:
        raise DataError(f"{root}: image folder is empty", "add one subfolder of images per class")
    records: list[Record] = []
    for folder in classes:
        files = [p for p in _visible(folder) if p.is_file()]
        if not files:
            raise DataError(f"{folder}: class folder has no images")
        for p in files:
            records.append({"image": load_image(p), "label": folder.name, "_source": str(p)})
    return records


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzipped or not) into an array of its stated shape."""
    path = Path(path)
    _check_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path}: not an IDX file (bad magic number)", "IDX files start with 0x00 0x00 TYPE NDIM"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX body has {len(data) - header} bytes, shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def idx_labels_path(images: Path) -> Path:
    """The labels file next to an IDX images file (MNIST naming: images-idx3 -> labels-idx1)."""
    name = images.name.replace("images", "labels").replace("idx3", "idx1")
    return images.with_name(name)


def read_idx_pair(images: Path | str, labels: Path | str | None = None) -> list[Record]:
    """IDX images (N, H, W[, C]) and labels (N,) into `{"image", "label"}` records."""
    images = Path(images)
    labels = Path(labels) if labels is not None else idx_labels_path(images)
    x, y = read_idx(images), read_idx(labels)
    if x.ndim not in (3, 4) or y.ndim != 1:
        raise DataError(f"{images}: expected images (N, H, W) and labels (N,), got {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{labels}: {len(y)} labels for {len(x)} images in {images.name}")
    return [{"image": x[i], "label": str(int(y[i])), "_source": f"{images}:{i}"} for i in range(len(x))]


_CONLLU_RANGE = re.compile(r"\d+[-.]\d+")  # CoNLL-U multiword-token ("3-4") and empty-node ("5.1") lines


def _column(index: int, width: int) -> int | None:
    """A 0-based column index (negative: from the end) resolved for a line of `width` fields."""
    resolved = index if index >= 0 else width + index
    return resolved if 0 <= resolved < width else None


def read_conll(
    path: Path | str, token_column: int = 0, tag_column: int = -1, require_label: bool = True
) -> list[Record]:
    """Read a token-per-line file (CoNLL, CoNLL-U, BIO) into `{"tokens", "tags"}` records.

    One token per line, its columns split by tabs (or by runs of spaces in a file without
    tabs); a blank line ends a sentence. A `-DOCSTART-` line starts a new document: the
    sentences after it carry `"doc": n` (0, 1, ...), so a split of the file keeps each
    document whole. A line that starts with `#` and has fewer columns than the file's first
    token line is a comment (CoNLL-U's `# sent_id = 1`); a token such as `#hashtag` on a line
    with the file's columns is a token. In a `.conllu` file the multiword-token and empty-node
    lines (IDs `3-4`, `5.1`) are skipped, so a column of the word lines is read.

    Args:
        path: the file (optionally .gz).
        token_column: 0-based index of the token column (negative counts from the end).
        tag_column: 0-based index of the tag column; -1, the default, is the last column.
        require_label: when False, lines may hold the token alone (inputs for prediction); a
            sentence then has tags on every line (a "tags" list) or on none (no "tags" key).

    Raises:
        DataError: naming `file:line` for a line without the token or tag column, a tag
            missing from a sentence whose other lines have one, or a file without sentences.
    """
    path = Path(path)
    _check_file(path)
    conllu = path.name.lower().removesuffix(".gz").endswith(".conllu")
    try:
        with _open_text(path) as f:
            lines = [line.rstrip() for line in f]  # trailing tabs and spaces are no empty column
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})", "save the file as UTF-8") from None
    tabbed = any("\t" in line for line in lines)

    def fields_of(line: str) -> list[str]:
        return [c.strip() for c in line.split("\t")] if tabbed else line.split()

    width = next((len(fields_of(ln)) for ln in lines if ln and not ln.startswith(("#", "-DOCSTART-"))), 0)
    columns = f"the token in column {token_column} and the tag in column {tag_column}"
    hint = "set data.token_column / data.tag_column (0-based; -1 is the last column)"
    records: list[Record] = []
    sentence: list[tuple[int, str, str | None]] = []  # (line, token, tag or None)
    doc: int | None = None

    def close() -> None:
        if not sentence:
            return
        untagged = [line_no for line_no, _, tag in sentence if tag is None]
        if untagged and len(untagged) < len(sentence):
            raise DataError(
                f"{path}:{untagged[0]}: no tag (column {tag_column}) in a sentence whose other lines have one",
                "give every token of a labelled sentence its tag",
            )
        record: Record = {"tokens": [token for _, token, _ in sentence]}
        if not untagged:
            record["tags"] = [tag for _, _, tag in sentence]
        if doc is not None:
            record["doc"] = doc
        record["_source"] = f"{path}:{sentence[0][0]}"
        records.append(record)
        sentence.clear()

    for line_no, line in enumerate(lines, 1):
        if not line:
            close()
            continue
        if line.startswith("-DOCSTART-"):
            close()
            doc = 0 if doc is None else doc + 1
            continue
        fields = fields_of(line)
        if line.startswith("#") and len(fields) < width:
            continue  # a comment
        if conllu and _CONLLU_RANGE.fullmatch(fields[0]):
            continue
        t_ix, g_ix = _column(token_column, len(fields)), _column(tag_column, len(fields))
        if g_ix == t_ix:
            g_ix = None  # -1 on a token-only line: the last column is the token itself
        if t_ix is None or (g_ix is None and require_label):
            n = len(fields)
            raise DataError(f"{path}:{line_no}: {n} column{'s' * (n != 1)}, too few for {columns}", hint)
        if not fields[t_ix]:
            raise DataError(f"{path}:{line_no}: empty token in column {token_column}", hint)
        tag = fields[g_ix] if g_ix is not None else None
        if tag in ("", "_"):
            raise DataError(f"{path}:{line_no}: empty tag {tag!r} in column {tag_column}", hint)
        sentence.append((line_no, fields[t_ix], tag))
    close()
    if not records:
        raise DataError(
            f"{path}: no sentences found", "one 'TOKEN TAG' per line, a blank line between sentences"
        )
    return records


def _looks_like_squad(path: Path) -> bool:
    """A .json file whose top level is an object with a "data" key (SQuAD's layout), read lightly."""
    try:
        with _open_text(path) as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return head.lstrip().startswith("{") and '"data"' in head


def read_squad(path: Path | str) -> list[Record]:
    """Read a SQuAD v1.1 / v2.0 JSON file: one record per question.

    Records are `{"id", "question", "context", "answers": [{"text", "answer_start"}], "doc"}`,
    `doc` being the article's title (a seeded split keeps an article's questions together).
    A v2 question marked `is_impossible` has no answers. Each answer must be the context's
    text at its `answer_start`: an offset off by one would train the model on the wrong span.

    Raises:
        DataError: naming the file and the question (its id, article and paragraph) at fault.
    """
    path = Path(path)
    _check_file(path)
    try:
        with _open_text(path) as f:
            root = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})", "save the file as UTF-8") from None
    shape = 'SQuAD JSON: {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}'
    articles = root.get("data") if isinstance(root, dict) else None
    if not isinstance(articles, list):
        raise DataError(f"{path}: no \"data\" list of articles at the top level", shape)
    records: list[Record] = []
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: article {a} has no \"paragraphs\" list", shape)
        title = str(article.get("title", a))
        for p, paragraph in enumerate(paragraphs):
            where = f"{path}: article {a} paragraph {p}"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not isinstance(paragraph.get("qas"), list):
                raise DataError(f"{where}: needs a \"context\" string and a \"qas\" list", shape)
            for q, qa in enumerate(paragraph["qas"]):
                records.append(_squad_record(qa, context, title, f"{where} question {q}", shape))
    if not records:
        raise DataError(f"{path}: no questions", shape)
    return records


def _squad_record(qa: Any, context: str, title: str, where: str, shape: str) -> Record:
    if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not qa["question"].strip():
        raise DataError(f"{where}: needs a non-empty \"question\" string", shape)
    where = f"{where} (id {qa['id']})" if "id" in qa else where
    raw = [] if qa.get("is_impossible") else qa.get("answers", [])
    if not isinstance(raw, list):
        raise DataError(f"{where}: \"answers\" must be a list", shape)
    answers = []
    for k, answer in enumerate(raw):
        text = answer.get("text") if isinstance(answer, dict) else None
        start = answer.get("answer_start") if isinstance(answer, dict) else None
        if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
            raise DataError(f"{where}: answer {k} needs \"text\" (a string) and \"answer_start\" (an integer)",
                            shape)
        if context[start : start + len(text)] != text:
            found = context[max(0, start) : start + len(text)]
            raise DataError(f"{where}: answer {k} {text!r} is not the context's text at {start} ({found!r})",
                            "answer_start is the answer's character offset in the context")
        answers.append({"text": text, "answer_start": start})
    return {"id": str(qa.get("id", where)), "question": qa["question"], "context": context, "answers": answers,
            "doc": title, "_source": where}


def read_text(path: Path | str) -> list[Record]:
    """One `{"text": line}` record per non-blank line."""
    path = Path(path)
    _check_file(path)
    with _open_text(path) as f:
        records = [
            {"text": line.rstrip("\n"), "_source": f"{path}:{i}"}
            for i, line in enumerate(f, 1)
            if line.strip()
        ]
    if not records:
        raise DataError(f"{path}: no text lines", "add one record per line")
    return records


def read_pairs(
    path: Path | str, source_column: str, target_column: str = "target", require_target: bool = True
) -> list[Record]:
    """Read source → target pairs (translation, summarization) from a CSV/TSV or JSONL file.

    Records are `{"text": source, "target": target, <other columns>}`; a row without both
    fields, or with an empty one, is a DataError naming its file and line.

    Args:
        path: a .csv/.tsv (header row) or .jsonl file, optionally .gz.
        source_column: the column (key) of the input text.
        target_column: the column (key) of the output text.
        require_target: when False the target may be absent (inputs for prediction).
    """
    path = Path(path)
    fmt = infer_format(path)
    if fmt not in ("csv", "jsonl"):
        raise DataError(f"{path}: source/target pairs are read from CSV, TSV or JSONL files, not {fmt}",
                        "save the pairs as .tsv or .jsonl")
    rows = read_csv(path, source_column, target_column, False) if fmt == "csv" else \
        read_jsonl(path, source_column, target_column, False)
    for row in rows:
        where = row["_source"]
        if "text" not in row:
            raise DataError(f"{where}: no source column {source_column!r}", "set data.source_column")
        if "label" in row:
            row["target"] = row.pop("label")
        elif require_target:
            raise DataError(f"{where}: no target column {target_column!r}", "set data.target_column")
        for key in ("text", "target"):
            if key in row and (not isinstance(row[key], str) or not row[key].strip()):
                column = source_column if key == "text" else target_column
                raise DataError(f"{where}: empty {column!r}", "every pair needs a source and a target text")
    return rows


def read_records(
    path: Path | str,
    format: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    require_label: bool = True,
    token_column: int = 0,
    tag_column: int = -1,
    source_column: str | None = None,
    target_column: str = "target",
    image_column: str = "image",
) -> list[Record]:
    """Read any supported file or folder; `format` defaults to `infer_format(path)`.

    `text_column`/`label_column` name the columns of CSV and JSONL files; `image_column` the
    JSONL key holding an image path (relative to the file); `token_column`/`tag_column` are
    the 0-based columns of a CoNLL file (`read_conll`). With `source_column`, a CSV/TSV/JSONL
    file holds source → target pairs (`read_pairs`).
    """
    path = Path(path)
    if source_column is not None:
        return read_pairs(path, source_column, target_column, require_label)
    fmt = format or infer_format(path)
    if fmt == "csv":
        return read_csv(path, text_column, label_column, require_label)
    if fmt == "jsonl":
        return read_jsonl(path, text_column, label_column, require_label, image_column)
    if fmt == "imagefolder":
        return read_image_folder(path, require_label)
    if fmt == "idx":
        return read_idx_pair(path)
    if fmt == "conll":
        return read_conll(path, token_column, tag_column, require_label)
    if fmt == "squad":
        return read_squad(path)
    if fmt == "text":
        return read_text(path)
    raise DataError(f"{path}: no reader for format {fmt!r}", f"dapeng reads: {', '.join(FORMATS)}")


def iter_labels(records: list[Record]) -> Iterator[Any]:
    for r in records:
        label = r.get("label")
        yield label if isinstance(label, str | int) else None


# ---------------------------------------------------------------- row by row, bad rows reported


class Row(NamedTuple):
    """One row of a file as `iter_rows` reads it: its columns, or why it can't be read.

    Attributes:
        line: the file line the row starts on (1-based; a CSV header is line 1).
        values: column name -> value as the file holds it; None for a bad row.
        error: why the row can't be read (None for a good row).
    """

    line: int
    values: dict[str, Any] | None
    error: str | None = None


def _open_lenient(path: Path):
    # Undecodable bytes become lone surrogates instead of an exception, so one bad row
    # is reported on its own line and the rest of the file is still read.
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")


def _undecodable(text: str) -> bool:
    try:
        text.encode("utf-8")  # the surrogates `_open_lenient` left for bad bytes don't encode
    except UnicodeEncodeError:
        return True
    return False


def _check_values(line: int, values: dict[str, Any], columns: Mapping[str, str]) -> Row:
    for column, option in columns.items():
        if column not in values:
            found = ", ".join(map(repr, values)) or "none"
            return Row(line, None, f"no key {column!r} (set {option} to one of: {found})")
        value = values[column]
        if value is None or (isinstance(value, str) and not value.strip()):
            return Row(line, None, f"empty {column!r}")
    return Row(line, values)


def iter_rows(path: Path | str, format: str | None = None, columns: Mapping[str, str] | None = None) -> Iterator[Row]:
    """Stream a CSV/TSV, JSONL or text file row by row, reporting bad rows instead of stopping.

    A bad row (undecodable bytes, malformed CSV or JSON, a wrong number of fields, a
    needed column missing or empty) comes out as a `Row` with its `error`; the rows after
    it are still read. Blank lines are skipped.

    Args:
        path: the file (.csv, .tsv, .jsonl, .txt, optionally .gz).
        format: "csv", "jsonl" or "text"; defaults to `infer_format(path)`.
        columns: the columns every row needs, each mapped to the option that names it
            (`{"review": "data.text_column"}`). A line of a text file, and a line of a JSONL
            file that holds a bare JSON string, is the value of the first of them.

    Raises:
        DataError: a problem with the whole file: missing or empty, another format, a CSV
            header without a needed column, or no rows at all.
    """
    path = Path(path)
    _check_file(path)
    fmt = format or infer_format(path)
    columns = dict(columns or {"text": "data.text_column"})
    readers = {"csv": _csv_rows, "jsonl": _jsonl_rows, "text": _text_rows}
    if fmt not in readers:
        raise DataError(f"{path}: can't read format {fmt!r} row by row", f"use one of: {', '.join(readers)}")
    empty = True
    for row in readers[fmt](path, columns):
        empty = False
        yield row
    if empty:
        raise DataError(f"{path}: no data rows", "add one record per line")


def _csv_rows(path: Path, columns: dict[str, str]) -> Iterator[Row]:
    delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    with _open_lenient(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise DataError(f"{path}:1: malformed CSV header: {err}") from None
        if header is None or not any(h.strip() for h in header):
            raise DataError(f"{path}: file is empty", "the first line must name the columns")
        if _undecodable("".join(header)):
            raise DataError(f"{path}:1: the header is not UTF-8 text", "save the file as UTF-8")
        header = [h.strip() for h in header]
        for column, option in columns.items():
            if column not in header:
                raise DataError(
                    f"{path}: no column {column!r}; columns found: {', '.join(map(repr, header))}",
                    f"set {option} to one of them",
                )
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield Row(start, None, f"malformed CSV: {err}")
                continue
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            if _undecodable("".join(fields)):
                yield Row(start, None, "not UTF-8 text")
            elif len(fields) != len(header):
                yield Row(start, None, f"row has {len(fields)} fields, the header has {len(header)} "
                                       "(quote fields that contain the delimiter)")
            else:
                yield _check_values(start, dict(zip(header, fields)), columns)


def _jsonl_rows(path: Path, columns: dict[str, str]) -> Iterator[Row]:
    first = next(iter(columns))
    with _open_lenient(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if _undecodable(line):
                yield Row(line_no, None, "not UTF-8 text")
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # an error's column, not "line 2 column 1"
            except json.JSONDecodeError as err:
                yield Row(line_no, None, f"invalid JSON at column {err.colno}: {err.msg}")
                continue
            if isinstance(obj, str):
                obj = {first: obj}
            if not isinstance(obj, dict):
                yield Row(line_no, None, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield _check_values(line_no, obj, columns)


def _text_rows(path: Path, columns: dict[str, str]) -> Iterator[Row]:
    first = next(iter(columns))
    with _open_lenient(path) as f:
        for line_no, line in enumerate(f, 1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            if _undecodable(text):
                yield Row(line_no, None, "not UTF-8 text")
                continue
            yield _check_values(line_no, {first: text}, columns)


__all__ = [
    "FORMATS",
    "Row",
    "idx_labels_path",
    "infer_format",
    "iter_rows",
    "load_image",
    "read_conll",
    "read_csv",
    "read_pairs",
    "read_idx",
    "read_idx_pair",
    "read_image_folder",
    "read_jsonl",
    "read_records",
    "read_text",
]
