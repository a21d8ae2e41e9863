"""`dapeng predict`: inputs on the command line or in a file, outputs printed or written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dapeng.cli.main import main
from dapeng.cli.serve import model_sources


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from dapeng.hub.artifact import save_artifact
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    run = tmp_path_factory.mktemp("rt-run")
    rng = np.random.default_rng(1)
    words = ["good", "bad", "film", "plot", "fine", "awful"]
    records = [{"text": " ".join(rng.choice(words, 4)), "label": ["fresh", "rotten"][i % 2]} for i in range(30)]
    task = TASKS.create("text-classification", tokenizer="word", vocab_size=32, max_length=16)
    task.setup(records)
    torch.manual_seed(0)
    kwargs = {**task.model_kwargs(), "hidden": 8, "layers": 1, "heads": 2, "intermediate": 16, "max_positions": 32}
    save_artifact(run / "model", model=MODELS.create("transformer", **kwargs), model_name="transformer",
                  model_kwargs=kwargs, task_name="text-classification", task_state=task.state())
    return run


def test_predict_texts_prints_label_and_score(run_dir, capsys):
    assert main(["predict", str(run_dir), "good film", "bad plot", "--precision", "fp32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("\tgood film")
    assert lines[0].split(" ")[0] in ("fresh", "rotten")


def test_predict_json_lines(run_dir, capsys):
    assert main(["predict", str(run_dir), "good film", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["text"] == "good film" and set(row["prediction"]) == {"label", "score", "probabilities"}


def test_predict_file_to_file_keeps_records_and_order(run_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    inputs = [{"text": "good film", "id": 1}, "bad plot", {"text": "fine", "label": "fresh", "id": 3}]
    source.write_text("\n".join(json.dumps(x) for x in inputs) + "\n\n")
    out = tmp_path / "out" / "preds.jsonl"
    assert main(["predict", str(run_dir), "--file", str(source), "--out", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in rows] == [1, None, 3] and rows[1]["text"] == "bad plot"
    assert rows[2]["label"] == "fresh" and all("prediction" in r for r in rows)
    assert [p.name for p in out.parent.iterdir()] == ["preds.jsonl"]  # nothing temporary left behind


def test_predict_errors_are_one_line(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    assert main(["predict", str(run_dir), "--file", str(bad), "--on-error", "fail"]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert main(["predict", str(run_dir)]) == 2
    assert main(["predict", str(tmp_path), "x"]) == 2
    assert main(["predict", str(run_dir), "x", "--batch-size", "0"]) == 2


def test_serve_names_models_by_run_folder_or_hub_name(run_dir):
    assert model_sources([str(run_dir), f"alias={run_dir}/model", "minilm-l6@1"]) == {
        run_dir.name: str(run_dir), "alias": f"{run_dir}/model", "minilm-l6": "minilm-l6@1",
    }
    assert model_sources([str(run_dir / "model")]) == {run_dir.name: str(run_dir / "model")}
    with pytest.raises(Exception, match="two models are named"):
        model_sources([str(run_dir), str(run_dir)])
