"""`load_splits(cfg)`: the train/eval/test records of a run, from the catalog or the user's files."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from dapeng.config import DataConfig
from dapeng.data.catalog import grouped_split, load_dataset, stratified_split
from dapeng.data.readers import iter_labels, read_records
from dapeng.errors import ConfigError
from dapeng.records import Record


class Splits(NamedTuple):
    """The records of one run; `test` may be an empty list."""

    train: list[Record]
    eval: list[Record]
    test: list[Record]


def _read(path: Path, cfg: DataConfig) -> list[Record]:
    return read_records(
        path, cfg.format, cfg.text_column, cfg.label_column,
        token_column=cfg.token_column, tag_column=cfg.tag_column, image_column=cfg.image_column,
    )


def _split(records: list[Record], sizes: list[float], seed: int) -> list[list[Record]]:
    labels = list(iter_labels(records))
    if records and all("doc" in r for r in records):  # no document's sentences on both sides
        parts = grouped_split([r["doc"] for r in records], labels, sizes, seed)
    else:
        parts = stratified_split(labels, sizes, seed)
    return [[records[i] for i in part] for part in parts]


def load_splits(cfg: DataConfig) -> Splits:
    """Records for training, evaluation and testing.

    A catalog `dataset` comes with its canonical split (files named in `eval`/`test`
    replace that part). User files: `train` is required; without `eval` (and `test`)
    files, a seeded stratified split of `train` by `eval_fraction` (and `test_fraction`)
    provides them; records that all carry a `"doc"` (a CoNLL file's `-DOCSTART-` documents, a
    JSONL field) are split as whole documents. `limit` caps every split at that many records, a seeded sample stratified by label
    (smoke runs).
    """
    if cfg.dataset and cfg.train:
        raise ConfigError(
            "data.dataset and data.train are both set", "use a catalog data set or your own files, not both"
        )
    if cfg.dataset:
        canonical = load_dataset(cfg.dataset)
        train = canonical["train"]
        eval_ = _read(cfg.eval, cfg) if cfg.eval else canonical["eval"]
        test = _read(cfg.test, cfg) if cfg.test else canonical["test"]
    elif cfg.train:
        train = _read(cfg.train, cfg)
        eval_ = _read(cfg.eval, cfg) if cfg.eval else None
        test = _read(cfg.test, cfg) if cfg.test else None
        if eval_ is None and test is None:
            train, eval_, test = _split(train, [cfg.eval_fraction, cfg.test_fraction], cfg.seed)
        elif eval_ is None:
            train, eval_ = _split(train, [cfg.eval_fraction], cfg.seed)
        test = test or []
    else:
        raise ConfigError(
            "data needs a dataset or a train file", "set data.dataset (see `dapeng data list`) or data.train"
        )
    if cfg.limit:
        train, eval_, test = (_sample(part, cfg.limit, cfg.seed) for part in (train, eval_, test))
    return Splits(train, eval_, test)


def _sample(records: list[Record], limit: int, seed: int) -> list[Record]:
    """At most `limit` records, a seeded sample stratified by label: a data set stored in class
    order (Fashion-MNIST's files, a CSV sorted by label) still gives a smoke run every class."""
    if len(records) <= limit:
        return records
    return [records[i] for i in stratified_split(list(iter_labels(records)), [limit], seed)[1]]
