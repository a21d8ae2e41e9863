"""Checkpoints: round trip, safe loading, corruption → CheckpointError, atomic writes, RNG and data order."""

import os
import random

import numpy as np
import pytest
import torch

from dapeng.errors import CheckpointError
from dapeng.train.checkpoint import atomic_write, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dapeng.train.sampler import ResumableBatchSampler


def test_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "step": 3, "nested": {"a": [1, 2.5, "x", None]}}
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c.pt", state))
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert loaded["step"] == 3 and loaded["nested"] == {"a": [1, 2.5, "x", None]}


def test_loading_never_runs_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path, damage):
    path = save_checkpoint(tmp_path / "c.pt", {"w": torch.randn(100)})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a zip" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="unknown format"):
        load_checkpoint(tmp_path / "plain.pt")


def test_a_write_that_dies_midway_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1, "w": torch.ones(1000)})

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")  # the process "dies" with half the bytes written
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, lambda f: f.write(b"one"))
    atomic_write(path, lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two"


def test_rng_states_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = load_checkpoint(save_checkpoint(tmp_path / "r.pt", {"rng": rng_state()}))["rng"]
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == expected


def test_sampler_is_seeded_per_epoch_and_resumes_mid_epoch():
    sampler = ResumableBatchSampler(10, 3, seed=5)
    sampler.set_epoch(1)
    full = list(sampler)
    assert len(full) == len(sampler) == 4 and sorted(sum(full, [])) == list(range(10))
    sampler.set_epoch(1, start=2)
    assert list(sampler) == full[2:]
    sampler.set_epoch(2)
    assert list(sampler) != full
    state = torch.get_rng_state()
    list(ResumableBatchSampler(10, 3, seed=5))
    assert torch.equal(torch.get_rng_state(), state)  # the data order never draws from the global RNG
    assert len(ResumableBatchSampler(10, 3, drop_last=True)) == 3
