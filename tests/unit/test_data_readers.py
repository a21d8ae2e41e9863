"""Readers for users' own data and `load_splits`: records out, one-line errors naming the place."""

import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from dapeng.config import DataConfig
from dapeng.data.readers import (
    infer_format,
    iter_rows,
    read_conll,
    read_csv,
    read_idx,
    read_idx_pair,
    read_image_folder,
    read_jsonl,
)
from dapeng.data.splits import load_splits
from dapeng.errors import ConfigError, DataError


def write(path, text):
    path.write_text(text)
    return path


def test_csv_with_own_column_names(tmp_path):
    f = write(tmp_path / "r.csv", 'review,stars,id\n"good, really",pos,1\nbad,neg,2\n')
    records = read_csv(f, text_column="review", label_column="stars")
    assert [(r["text"], r["label"], r["id"]) for r in records] == [
        ("good, really", "pos", "1"),
        ("bad", "neg", "2"),
    ]
    assert records[1]["_source"] == f"{f}:3"


def test_tsv_by_suffix(tmp_path):
    f = write(tmp_path / "r.tsv", "text\tlabel\na, b\tx\n")
    assert read_csv(f)[0] == {"text": "a, b", "label": "x", "_source": f"{f}:2"}


def test_unknown_label_column_lists_columns(tmp_path):
    f = write(tmp_path / "r.csv", "review,stars\ngood,pos\n")
    with pytest.raises(DataError, match=r"no label column 'label'; columns found: 'review', 'stars'") as err:
        read_csv(f, text_column="review")
    assert "r.csv" in str(err.value) and "label_column" in str(err.value)


def test_ragged_row_names_the_line(tmp_path):
    f = write(tmp_path / "r.csv", "text,label\ngood,pos\nbad,neg,extra\n")
    with pytest.raises(DataError, match=r"r\.csv:3: row has 3 fields, the header has 2"):
        read_csv(f)


def test_empty_label_names_line_and_column(tmp_path):
    f = write(tmp_path / "r.csv", "text,label\ngood,\n")
    with pytest.raises(DataError, match=r"r\.csv:2: empty label in column 2 \('label'\)"):
        read_csv(f)


@pytest.mark.parametrize("content, message", [("", "file is empty"), ("text,label\n", "no data rows")])
def test_empty_csv(tmp_path, content, message):
    f = write(tmp_path / "r.csv", content)
    with pytest.raises(DataError, match=message):
        read_csv(f)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        read_csv(tmp_path / "nope.csv")


def test_jsonl_errors_name_the_line(tmp_path):
    f = write(tmp_path / "r.jsonl", '{"t": "ok", "y": 1}\n\n{"t": "bad"\n')
    with pytest.raises(DataError, match=r"r\.jsonl:3: invalid JSON"):
        read_jsonl(f, "t", "y")
    g = write(tmp_path / "g.jsonl", '{"t": "ok", "z": 1}\n')
    with pytest.raises(DataError, match=r"g\.jsonl:1: no key 'y'; keys found: 't', 'z'"):
        read_jsonl(g, "t", "y")
    h = write(tmp_path / "h.jsonl", json.dumps({"t": "fine", "y": 3}) + "\n")
    assert read_jsonl(h, "t", "y")[0]["label"] == "3"


def _png(path, value, mode="L", size=(6, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder(tmp_path):
    _png(tmp_path / "cat" / "a.png", 10)
    _png(tmp_path / "dog" / "b.png", (1, 2, 3), mode="RGB")
    (tmp_path / ".DS_Store").write_text("ignored")
    records = read_image_folder(tmp_path)
    assert [r["label"] for r in records] == ["cat", "dog"]
    assert records[0]["image"].shape == (6, 6) and records[1]["image"].shape == (6, 6, 3)


def test_non_image_file_in_image_folder(tmp_path):
    _png(tmp_path / "cat" / "a.png", 10)
    (tmp_path / "cat" / "notes.txt").write_text("not a picture")
    with pytest.raises(DataError, match=r"cat/notes\.txt: not an image"):
        read_image_folder(tmp_path)


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="image folder is empty"):
        read_image_folder(tmp_path)
    _png(tmp_path / "loose.png", 1)
    with pytest.raises(DataError, match="loose.png: file outside a class subfolder"):
        read_image_folder(tmp_path)
    assert read_image_folder(tmp_path, require_label=False)[0]["image"].shape == (6, 6)


def _idx(path, array):
    dtype_code = {np.uint8: 0x08}[array.dtype.type]
    path.write_bytes(
        bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )


def test_idx_pair_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _idx(tmp_path / "train-images-idx3-ubyte", images)
    _idx(tmp_path / "train-labels-idx1-ubyte", np.array([7, 1], dtype=np.uint8))
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte"), images)
    records = read_idx_pair(tmp_path / "train-images-idx3-ubyte")
    assert [r["label"] for r in records] == ["7", "1"] and records[1]["image"].shape == (3, 4)


def test_idx_errors(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)
    _idx(bad, np.zeros((2, 2), dtype=np.uint8))
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(DataError, match="IDX body has 3 bytes"):
        read_idx(bad)


def test_conll(tmp_path):
    f = write(tmp_path / "ner.conll", "John B-PER\nruns O\n\nHi O\n")
    assert [r["tokens"] for r in read_conll(f)] == [["John", "runs"], ["Hi"]]


def test_infer_format(tmp_path):
    assert infer_format(tmp_path) == "imagefolder"
    assert infer_format(tmp_path / "a.csv.gz") == "csv"
    assert infer_format(tmp_path / "a.jsonl") == "jsonl"
    assert infer_format(tmp_path / "t10k-images-idx3-ubyte.gz") == "idx"
    with pytest.raises(DataError, match="set data.format"):
        write(tmp_path / "a.weird", "x")
        infer_format(tmp_path / "a.weird")


def _labelled_csv(tmp_path, n=100):
    rows = "".join(f"text {i},{'pos' if i % 4 else 'neg'}\n" for i in range(n))
    return write(tmp_path / "all.csv", "text,label\n" + rows)


def test_load_splits_from_user_csv_is_stratified_and_seeded(tmp_path):
    cfg = DataConfig(train=_labelled_csv(tmp_path), eval_fraction=0.2, test_fraction=0.2, seed=5)
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (60, 20, 20)
    assert sum(r["label"] == "neg" for r in splits.eval) == 5
    assert load_splits(cfg) == splits
    assert {r["text"] for r in splits.train}.isdisjoint(r["text"] for r in splits.test)


def test_load_splits_with_eval_file_and_limit(tmp_path):
    dev = write(tmp_path / "dev.csv", "text,label\na,pos\nb,neg\n")
    splits = load_splits(DataConfig(train=_labelled_csv(tmp_path), eval=dev, limit=10))
    assert len(splits.train) == 10 and len(splits.eval) == 2 and splits.test == []


def test_load_splits_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match="needs a dataset or a train file"):
        load_splits(DataConfig())
    with pytest.raises(ConfigError, match="both set"):
        load_splits(DataConfig(dataset="digits", train=_labelled_csv(tmp_path)))


def test_iter_rows_reads_on_after_a_bad_row(tmp_path):
    path = tmp_path / "rows.csv.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'review,n\nok,1\n"' + b"x" * 140_000 + b'",2\nafter,3\nbad,\xff\n"open quote,4\nswallowed,5\n')
    rows = list(iter_rows(path, columns={"review": "--text-column"}))
    assert [(r.line, r.values) for r in rows if r.error is None] == [(2, {"review": "ok", "n": "1"}),
                                                                      (4, {"review": "after", "n": "3"})]
    assert [(r.line, r.error) for r in rows if r.error is not None] == [
        (3, "malformed CSV: field larger than field limit (131072)"),
        (5, "not UTF-8 text"),
        (6, "row has 1 fields, the header has 2 (quote fields that contain the delimiter)"),
    ]


def test_iter_rows_whole_file_problems_are_errors(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text,label\nhi,a\n")
    with pytest.raises(DataError, match=r"no column 'review'; columns found: 'text', 'label' — set --text-column"):
        list(iter_rows(path, columns={"review": "--text-column"}))
    path.write_text("text\n\n")
    with pytest.raises(DataError, match="no data rows"):
        list(iter_rows(path))
