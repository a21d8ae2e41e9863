"""Bad data through the command line: a one-line error naming the place, exit 2, nothing half-written."""

import hashlib
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dapeng.cli.main import main
from dapeng.data import catalog
from dapeng.data.catalog import DataFile, DatasetEntry, Origin, Url


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def text_config(tmp_path: Path, **data) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "task": "text-classification",
                "task_options": {"tokenizer": "word"},
                "data": data,
                "model": {"name": "textcnn", "kwargs": {"embed_dim": 8, "filters": 4}},
                "train": {"epochs": 1, "batch_size": 4},
            }
        )
    )
    return cfg


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "\n" not in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def assert_nothing_trained(run: Path) -> None:
    assert not (run / "model").exists() and not (run / "checkpoints" / "last.pt").exists()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_missing_file(tmp_path, capsys):
    cfg = text_config(tmp_path, train="nope.csv")
    code, err = run_cli(capsys, "train", str(cfg), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "nope.csv")
    assert_nothing_trained(tmp_path / "run")


def test_empty_file(tmp_path, capsys):
    write(tmp_path / "train.csv", "")
    code, err = run_cli(
        capsys, "train", str(text_config(tmp_path, train="train.csv")), "--out", str(tmp_path / "run")
    )
    assert_one_line_error(code, err, "train.csv: file is empty")
    assert_nothing_trained(tmp_path / "run")


def test_ragged_csv_row(tmp_path, capsys):
    write(tmp_path / "train.csv", "text,label\ngood,pos\nbad,neg,oops\n")
    code, err = run_cli(
        capsys, "train", str(text_config(tmp_path, train="train.csv")), "--out", str(tmp_path / "run")
    )
    assert_one_line_error(code, err, "train.csv:3: row has 3 fields, the header has 2")
    assert_nothing_trained(tmp_path / "run")


def test_unknown_label_column_lists_the_columns(tmp_path, capsys):
    write(tmp_path / "train.csv", "review,stars\ngood,pos\n")
    cfg = text_config(tmp_path, train="train.csv", text_column="review")
    code, err = run_cli(capsys, "train", str(cfg), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "no label column 'label'", "'review', 'stars'")


def test_unknown_label_at_test_time(tmp_path, capsys):
    rows = "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(6))
    write(tmp_path / "train.csv", "text,label\n" + rows)
    write(tmp_path / "test.csv", "text,label\nso-so film,meh\n")
    cfg = text_config(tmp_path, train="train.csv", test="test.csv")
    code, err = run_cli(capsys, "train", str(cfg), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "test.csv:2: unknown label 'meh'", "neg, pos")
    assert_nothing_trained(tmp_path / "run")


def test_non_image_file_in_image_folder(tmp_path, capsys):
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        Image.new("L", (8, 8), 0).save(tmp_path / "images" / label / "x.png")
    write(tmp_path / "images" / "b" / "readme.txt", "not a picture")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "task": "image-classification",
                "data": {"train": "images"},
                "model": {"name": "lenet"},
                "train": {"epochs": 1},
            }
        )
    )
    code, err = run_cli(capsys, "train", str(cfg), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "b/readme.txt: not an image")
    assert_nothing_trained(tmp_path / "run")


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    """A catalog entry whose one file comes from a local file:// URL."""
    monkeypatch.setenv("DAPENG_HOME", str(tmp_path / "home"))
    source = tmp_path / "source.txt"
    source.write_bytes(b"the real bytes")
    entry = DatasetEntry(
        name="fake",
        description="test",
        kind="text-classification",
        license="CC0",
        homepage="",
        files=(DataFile("data.txt", hashlib.sha256(b"the real bytes").hexdigest(), 14),),
        origins=(Origin({"data.txt": (Url(source.as_uri()), None)}),),
        loader=None,
    )
    monkeypatch.setitem(catalog.CATALOG, "fake", entry)
    return source


def test_corrupt_cache_is_refetched(fake_entry, tmp_path, capsys):
    assert run_cli(capsys, "data", "fetch", "fake")[0] == 0
    cached = tmp_path / "home" / "datasets" / "fake" / "data.txt"
    cached.write_bytes(b"bit rot")
    assert run_cli(capsys, "data", "fetch", "fake")[0] == 0
    assert cached.read_bytes() == b"the real bytes"


def test_corrupt_source_is_a_clear_error(fake_entry, tmp_path, capsys):
    fake_entry.write_bytes(b"tampered")
    code, err = run_cli(capsys, "data", "fetch", "fake")
    assert_one_line_error(code, err, "checksum mismatch for", "fake/data.txt")
    assert list((tmp_path / "home" / "datasets" / "fake").iterdir()) == []
