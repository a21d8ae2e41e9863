"""The local hub store: versions, names that can't escape, cards, atomic add/remove."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from dapeng.errors import CheckpointError, DapengError, NotFoundError
from dapeng.hub.store import Store, parse_name


def make_artifact(path, task="text-classification", value=1.0):
    path.mkdir(parents=True)
    save_file({"w": np.full((2, 2), value, dtype=np.float32)}, str(path / "model.safetensors"))
    meta = {"format": 1, "dapeng": "0.1.0", "task": task, "model": {"name": "mlp", "kwargs": {"hidden": 4}},
            "labels": ["fresh", "rotten"], "metrics": {"test": {"accuracy": 0.875}}, "parent": "minilm-l6@1"}
    (path / "dapeng.json").write_text(json.dumps(meta))
    return path


def test_add_versions_resolve_and_remove(tmp_path):
    store = Store(tmp_path / "hub")
    a = make_artifact(tmp_path / "a")
    e1 = store.add(a, "clf")
    e2 = store.add(a, "clf")
    assert (e1.version, e2.version) == (1, 2)
    assert store.resolve("clf") == e2.path
    assert store.resolve("clf@1") == e1.path
    assert store.versions("clf") == [1, 2]
    card = (e1.path / "card.md").read_text()
    assert "fresh, rotten" in card and "0.875" in card and "minilm-l6@1" in card
    assert [e.ref for e in store.entries()] == ["clf@1", "clf@2"]
    assert [e.ref for e in store.remove("clf@2")] == ["clf@2"]
    assert store.resolve("clf") == e1.path
    store.remove("clf")
    assert store.entries() == []
    assert not (tmp_path / "hub" / "clf").exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "/abs", "x@0", "x@v2", "", ".hidden", "a\\b"])
def test_bad_names_are_one_line_errors(tmp_path, name):
    store = Store(tmp_path / "hub")
    with pytest.raises(DapengError) as err:
        store.add(make_artifact(tmp_path / "a"), name)
    assert "\n" not in str(err.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and "hub" in p.parts]
    assert not (tmp_path / "evil").exists()


def test_parse_name():
    assert parse_name("minilm-l6") == ("minilm-l6", None)
    assert parse_name("smollm2-135m@3") == ("smollm2-135m", 3)


def test_add_rejects_incomplete_or_truncated_artifacts(tmp_path):
    store = Store(tmp_path / "hub")
    with pytest.raises(CheckpointError, match="not found"):
        store.add((tmp_path / "empty"), "x")
    a = make_artifact(tmp_path / "a")
    blob = (a / "model.safetensors").read_bytes()
    (a / "model.safetensors").write_bytes(blob[:-5])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        store.add(a, "x")
    assert store.entries() == []
    assert not [p for p in (tmp_path / "hub").rglob("*") if p.is_file()]


def test_unknown_name_and_version(tmp_path):
    store = Store(tmp_path / "hub")
    store.add(make_artifact(tmp_path / "a"), "clf")
    with pytest.raises(NotFoundError, match="stored versions: 1"):
        store.resolve("clf@5")
    with pytest.raises(NotFoundError, match="no model 'nope'"):
        store.resolve("nope")
    with pytest.raises(NotFoundError):
        store.remove("nope")
