"""Artifact save/load: round trip, the dapeng.json contract, card, validation of every file."""

import json

import pytest
import torch
from _trainer_toy import ToyNet, ToyTask, make_records, register

from dapeng.errors import CheckpointError, ModelError
from dapeng.hub.artifact import load_artifact, save_artifact

torch.set_num_threads(1)
register()


def saved(tmp_path, **extra):
    records = make_records(16)
    task = ToyTask(scale=0.5)
    task.setup(records)
    model = ToyNet(**task.model_kwargs())
    path = save_artifact(
        tmp_path / "model", model=model, model_name="toy-mlp", model_kwargs=task.model_kwargs(),
        task_name="toy-classification", task_state={**task.state(), **extra},
        metrics={"test": {"accuracy": 0.75}}, card={"data": "synthetic blobs", "license": "CC0"},
    )
    return path, model, task, task.encode(records)


def test_round_trip_gives_the_same_outputs(tmp_path):
    path, model, task, items = saved(tmp_path)
    art = load_artifact(path)
    x = task.collate(items)["x"]
    model.eval()
    assert torch.equal(art.model(x), model(x))
    assert art.task.labels == task.labels and art.task.scale == 0.5
    assert art.path == path and not art.model.training


def test_dapeng_json_contract_and_card(tmp_path):
    path, _, _, _ = saved(tmp_path, tokenizer='{"model": "wordpiece"}')
    meta = json.loads((path / "dapeng.json").read_text())
    assert meta["format"] == 1 and meta["task"] == "toy-classification"
    assert meta["model"] == {"name": "toy-mlp", "kwargs": {"in_features": 8, "num_labels": 3}}
    assert meta["labels"] == ["c0", "c1", "c2"]
    assert meta["preprocess"] == {"dim": 8, "scale": 0.5}
    assert meta["quantization"] is None and meta["parent"] is None
    assert (path / "tokenizer.json").read_text() == '{"model": "wordpiece"}'
    card = (path / "card.md").read_text()
    for section in ("## Data", "synthetic blobs", "## License", "CC0", "## Metrics", "0.7500", "## Intended use",
                    "## Limits"):
        assert section in card
    assert sorted(p.name for p in path.parent.iterdir()) == ["model"]  # no temp folders left


def test_saving_over_an_artifact_replaces_it(tmp_path):
    path, _, _, _ = saved(tmp_path)
    path2, model2, task, items = saved(tmp_path)
    assert path2 == path
    x = task.collate(items)["x"]
    model2.eval()
    assert torch.equal(load_artifact(path).model(x), model2(x))


def test_bf16_precision(tmp_path):
    path, _, _, _ = saved(tmp_path)
    assert next(load_artifact(path, precision="bf16").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="precision"):
        load_artifact(path, precision="fp8")


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_artifact(tmp_path / "nothing")
    path, _, _, _ = saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_artifact(path)


def test_corrupt_weights_and_json(tmp_path):
    path, _, _, _ = saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_artifact(path)
    (path / "dapeng.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_artifact(path)


def test_weights_that_dont_match_the_config(tmp_path):
    path, _, _, _ = saved(tmp_path)
    meta = json.loads((path / "dapeng.json").read_text())
    meta["model"]["kwargs"]["num_labels"] = 5
    (path / "dapeng.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"weight head.weight has shape \(3, 16\), the model config needs \(5, 16\)"):
        load_artifact(path)
    meta["model"]["kwargs"] = {"in_features": 8, "num_labels": 3, "hidden": 16, "bogus": 1}
    (path / "dapeng.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="rejects its arguments"):
        load_artifact(path)


def test_tied_weights_round_trip(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self, in_features: int = 8, num_labels: int = 8) -> None:
            super().__init__()
            self.a = torch.nn.Linear(in_features, num_labels, bias=False)
            self.b = torch.nn.Linear(in_features, num_labels, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    from dapeng.models import MODELS

    MODELS.register("toy-tied", Tied)
    model = Tied()
    path = save_artifact(tmp_path / "m", model=model, model_name="toy-tied", model_kwargs={},
                         task_name="toy-classification", task_state={"labels": ["a"], "dim": 8, "scale": 1.0})
    loaded = load_artifact(path).model
    assert torch.equal(loaded.a.weight, model.a.weight) and loaded.a.weight is loaded.b.weight
