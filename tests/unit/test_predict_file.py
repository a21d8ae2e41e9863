"""`dapeng predict --file` on the files users train on, and options anywhere on every verb's command line."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import dapeng
from dapeng.cli.main import build_parser, main

WORDS = ["good", "bad", "film", "plot", "fine", "awful"]


def _text_artifact(path: Path) -> Path:
    from dapeng.hub.artifact import save_artifact
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    rng = np.random.default_rng(1)
    records = [{"text": " ".join(rng.choice(WORDS, 4)), "label": ["pos", "neg"][i % 2]} for i in range(30)]
    task = TASKS.create("text-classification", tokenizer="word", vocab_size=32, max_length=16)
    task.setup(records)
    torch.manual_seed(0)
    kwargs = {**task.model_kwargs(), "hidden": 8, "layers": 1, "heads": 2, "intermediate": 16, "max_positions": 32}
    return save_artifact(path, model=MODELS.create("transformer", **kwargs), model_name="transformer",
                         model_kwargs=kwargs, task_name="text-classification", task_state=task.state())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run trained on a CSV whose text column is `review` and label column `sentiment`."""
    run = tmp_path_factory.mktemp("reviews-run")
    _text_artifact(run / "model")
    (run / "config.yaml").write_text(
        "task: text-classification\n"
        "data: {train: /gone/train.csv, text_column: review, label_column: sentiment}\n"
        "model: {name: transformer}\n"
    )
    return run


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """An Artifact folder with no run directory around it."""
    return _text_artifact(tmp_path_factory.mktemp("bare") / "artifact")


@pytest.fixture(scope="module")
def image_artifact(tmp_path_factory):
    from dapeng.hub.artifact import save_artifact
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 256, (8, 8), dtype=np.uint8), "label": "ab"[i % 2]} for i in range(8)]
    task = TASKS.create("image-classification")
    task.setup(records)
    torch.manual_seed(0)
    kwargs = {**task.model_kwargs(), "hidden": 8, "layers": 1}
    return save_artifact(tmp_path_factory.mktemp("img") / "model", model=MODELS.create("mlp", **kwargs),
                         model_name="mlp", model_kwargs=kwargs, task_name="image-classification",
                         task_state=task.state())


def _predict(capsys, *argv: str) -> tuple[int, list[dict], list[str]]:
    code = main(["predict", *argv, "--json", "--precision", "fp32"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err.splitlines()


def _expected(model: Path | str, inputs: list) -> list:
    from dapeng.pipeline import to_json

    return to_json(dapeng.load(model, precision="fp32").predict(inputs))


def test_csv_rows_use_the_runs_text_column_only(run_dir, tmp_path, capsys):
    source = tmp_path / "train.csv"
    source.write_text('id,review,sentiment\n7,good film,pos\n8,"bad, awful plot",neg\n\n9,fine,pos\n')
    code, rows, err = _predict(capsys, str(run_dir), "--file", str(source))
    assert code == 0 and err == []
    assert [r["line"] for r in rows] == [2, 3, 5]  # file lines: the header is line 1, line 4 is blank
    assert [(r["id"], r["review"], r["sentiment"]) for r in rows][1] == ("8", "bad, awful plot", "neg")
    # Neither the header nor the label column reaches the model: each row predicts as its review alone.
    assert [r["prediction"] for r in rows] == _expected(run_dir, ["good film", "bad, awful plot", "fine"])


def test_jsonl_records_keyed_by_the_training_column(run_dir, tmp_path, capsys):
    source = tmp_path / "dev.jsonl"
    source.write_text('{"review": "good plot", "sentiment": "pos"}\n\n"a bare string"\n')
    code, rows, _ = _predict(capsys, str(run_dir), "--file", str(source))
    assert code == 0 and [(r["line"], r["review"]) for r in rows] == [(1, "good plot"), (3, "a bare string")]
    assert [r["prediction"] for r in rows] == _expected(run_dir, ["good plot", "a bare string"])


def test_bad_rows_are_reported_by_line_and_the_good_ones_predicted(run_dir, tmp_path, capsys):
    source = tmp_path / "mixed.csv"
    source.write_bytes(b"review,sentiment\n"
                       b"good film,pos\n"
                       b"too,many,fields\n"
                       b",neg\n"
                       b"caf\xe9 film,pos\n"
                       + b"long " * 20 + b",neg\n"
                       b"fine plot,pos\n")
    code, rows, err = _predict(capsys, str(run_dir), "--file", str(source), "--max-chars", "60")
    assert code == 0 and [r["line"] for r in rows] == [2, 7]
    assert [r["prediction"] for r in rows] == _expected(run_dir, ["good film", "fine plot"])
    skipped = [line for line in err if line.endswith("(skipped)")]
    assert [re.search(r"mixed\.csv:(\d+): ", line)[1] for line in skipped] == ["3", "4", "5", "6"]
    assert "3 fields, the header has 2" in skipped[0] and "empty 'review'" in skipped[1]
    assert "not UTF-8" in skipped[2] and "100 characters, over --max-chars 60" in skipped[3]
    assert "2 predictions (4 bad rows of" in err[-1]


def test_bad_jsonl_lines_are_skipped(run_dir, tmp_path, capsys):
    source = tmp_path / "dev.jsonl"
    source.write_text('{"review": "good"}\n{"review": \n{"text": "x"}\n[1]\n{"review": 3}\n{"review": "bad"}\n')
    code, rows, err = _predict(capsys, str(run_dir), "--file", str(source))
    assert code == 0 and [r["line"] for r in rows] == [1, 6]
    assert len(err) == 5 and "dev.jsonl:2: invalid JSON" in err[0]
    assert "dev.jsonl:3: no key 'review' (set --text-column to one of: 'text')" in err[1]
    assert "expected a JSON object, got list" in err[2] and "'review' must be a string, not int" in err[3]


def test_on_error_fail_stops_with_exit_2_and_writes_nothing(run_dir, tmp_path, capsys):
    source = tmp_path / "dev.csv"
    source.write_text("review\ngood\n,\nfine\n")
    out = tmp_path / "preds" / "out.jsonl"
    code = main(["predict", str(run_dir), "--file", str(source), "--on-error", "fail", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dev.csv:3: row has 2 fields, the header has 1" in err[0]
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_out_file_skips_bad_rows_and_every_bad_file_is_an_error(run_dir, tmp_path, capsys):
    source = tmp_path / "dev.tsv"
    source.write_text("review\tsentiment\ngood film\tpos\n\tneg\n")
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(run_dir), "--file", str(source), "--out", str(out)]) == 0
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [2]
    assert "wrote 1 prediction to" in capsys.readouterr().err
    source.write_text("review\tsentiment\n\tneg\n")
    assert main(["predict", str(run_dir), "--file", str(source)]) == 2
    assert "no row of" in capsys.readouterr().err.splitlines()[-1]


def test_an_artifact_without_a_run_reads_the_tasks_input_field(artifact, tmp_path, capsys):
    source = tmp_path / "in.csv"
    source.write_text("text,review\ngood film,awful plot\n")
    code, rows, _ = _predict(capsys, str(artifact), "--file", str(source))
    assert code == 0 and rows[0]["prediction"] == _expected(artifact, ["good film"])[0]
    code, rows, _ = _predict(capsys, str(artifact), "--file", str(source), "--text-column", "review")
    assert code == 0 and rows[0]["prediction"] == _expected(artifact, ["awful plot"])[0]
    assert main(["predict", str(artifact), "--file", str(source), "--text-column", "body"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no column 'body'; columns found: 'text', 'review'" in err and "--text-column" in err


def test_text_files_are_one_input_per_line(artifact, tmp_path, capsys):
    source = tmp_path / "inputs.md"
    source.write_text("good film\n\nbad plot\n")
    code, rows, _ = _predict(capsys, str(artifact), "--file", str(source))
    assert code == 0 and [(r["line"], r["text"]) for r in rows] == [(1, "good film"), (3, "bad plot")]


def test_image_column_paths_are_relative_to_the_file(image_artifact, tmp_path, capsys, monkeypatch):
    from PIL import Image

    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    pictures = [np.full((8, 8), 40, np.uint8), np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))]
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(folder / "img" / f"{i}.png")
    (folder / "img" / "note.png").write_text("not a picture")
    source = folder / "test.csv"
    source.write_text("image,label\nimg/0.png,a\nimg/missing.png,b\nimg/note.png,a\nimg/1.png,b\n")
    monkeypatch.chdir(tmp_path)  # the paths resolve against the file's folder, not the working directory
    code, rows, err = _predict(capsys, str(image_artifact), "--file", "data/test.csv")
    assert code == 0 and [(r["line"], r["image"]) for r in rows] == [(2, "img/0.png"), (5, "img/1.png")]
    assert [r["prediction"] for r in rows] == _expected(image_artifact, pictures)
    assert "test.csv:3: no image file" in err[0] and "test.csv:4:" in err[1] and "not an image" in err[1]


def test_predict_json_before_the_text(artifact, capsys):
    assert main(["predict", str(artifact), "--json", "good film", "--precision", "fp32", "bad plot"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["good film", "bad plot"]


# Each verb with its options after and then before (or between) its positionals: the same namespace.
ORDERS = {
    "train": ("train c.yaml --out r --set a=1 --json", "train --out r --json c.yaml --set a=1"),
    "eval": ("eval r --split test --json", "eval --json --split test r"),
    "predict": ("predict r 'a film' 'a plot' --json --file f.csv", "predict --json r --file f.csv 'a film' 'a plot'"),
    "explain": ("explain r 'a film' --method attention --json", "explain --method attention r --json 'a film'"),
    "distill": ("distill s.yaml --out r --json", "distill --json s.yaml --out r"),
    "serve": ("serve a b --port 9 --max-batch-size 4", "serve --port 9 a --max-batch-size 4 b"),
    "generate": ("generate lm --prompt hi --json", "generate --json --prompt hi lm"),
    "embed": ("embed minilm-l6 'a film' 'a plot' --json", "embed minilm-l6 --json 'a film' 'a plot'"),
    "hub": ("hub show m@2 --json", "hub show --json m@2"),
    "data": ("data info mnist --json", "data info --json mnist"),
    "models": ("models show cnn --set widths=[8] --json", "models show --json cnn --set widths=[8]"),
    "export": ("export r --format onnx --out d --json", "export --format onnx --json r --out d"),
    "quantize": ("quantize r --method int8-dynamic --max-drop 1 --json", "quantize --json --method int8-dynamic r --max-drop 1"),
    "prune": ("prune r --sparsity 0.5 --structured --json", "prune --json --structured r --sparsity 0.5"),
    "topics": ("topics r --top 5 --doc x --json", "topics --json --doc x r --top 5"),
}


def test_every_verb_is_covered():
    from dapeng.cli.main import VERBS

    assert set(ORDERS) == set(VERBS)


@pytest.mark.parametrize("verb", sorted(ORDERS))
def test_options_before_or_after_the_positionals(verb):
    after, before = (build_parser().parse_args(shlex.split(argv)) for argv in ORDERS[verb])
    assert vars(after) == vars(before)


def _readme_commands() -> list[str]:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", readme, re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("dapeng ")]


def test_readme_commands_parse():
    commands = _readme_commands()
    assert any("predict" in c and ".csv" in c for c in commands)
    for command in commands:
        build_parser().parse_args(shlex.split(command, comments=True)[1:])
