"""Unlabeled text: `data.unlabeled` (a labelled set's text only), the SOTU and Shakespeare catalog entries,
and causal-lm trained from scratch on catalog text."""

from __future__ import annotations

import json

import pytest

from dapeng.config import DataConfig, validate_config
from dapeng.data import load_splits


def test_unlabeled_drops_labels_and_tags_and_gives_tagged_sentences_text(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": f"review {i}", "label": "fresh" if i % 2 else "rotten"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labelled = load_splits(DataConfig(train=path))
    unlabeled = load_splits(DataConfig(train=path, unlabeled=True))
    assert [r["text"] for r in unlabeled.train] == [r["text"] for r in labelled.train]  # the same split
    assert all("label" not in r for part in unlabeled for r in part)

    from dapeng.data.splits import _without_labels

    [sentence] = _without_labels([{"tokens": ["The", "cat", "sat"], "tags": ["AT", "NN", "VBD"], "doc": "ca01"}])
    assert sentence == {"tokens": ["The", "cat", "sat"], "doc": "ca01", "text": "The cat sat"}


def test_unlabeled_reads_files_without_a_label_column(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(10)))
    assert len(load_splits(DataConfig(train=path, unlabeled=True)).train) == 8


@pytest.mark.data
def test_sotu_and_shakespeare_load_with_their_canonical_splits():
    from dapeng.data.catalog import load_dataset

    sotu = load_dataset("sotu")
    assert len({r["address"] for v in sotu.values() for r in v}) == 233  # passages, whole addresses per split
    assert {"year", "name", "party", "text"} <= set(sotu["test"][0])
    shakespeare = load_dataset("shakespeare")
    works = {part: {r["work"] for r in records} for part, records in shakespeare.items()}
    assert len(works["eval"]) == 4 and len(works["test"]) == 4
    assert not (works["train"] & works["test"]) and not (works["eval"] & works["test"])  # whole works apart


@pytest.mark.data
def test_causal_lm_trains_from_scratch_on_catalog_text(tmp_path):
    from dapeng.pipeline import load
    from dapeng.runner import train

    cfg = validate_config({
        "task": "causal-lm", "task_options": {"vocab_size": 400, "block_size": 32, "max_length": 64},
        "data": {"dataset": "shakespeare", "limit": 200},
        "model": {"name": "lm", "kwargs": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64,
                                           "max_positions": 64}},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 8},
    })
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["metrics"]["test"]["perplexity"] < 1e6
    assert isinstance(load(tmp_path / "run").generate("ROMEO.", max_new_tokens=4), str)
