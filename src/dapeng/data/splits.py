"""`load_splits(cfg)`: the train/eval/test records of a run, from the catalog or the user's files."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from dapeng.config import DataConfig
from dapeng.data.catalog import grouped_split, load_dataset, stratified_split
from dapeng.data.readers import iter_labels, read_records
from dapeng.errors import ConfigError, DataError
from dapeng.records import Record


class Splits(NamedTuple):
    """The records of one run; `test` may be an empty list; `unlabeled` is the pool a few-label
    split (`data.labels_per_class`, `data.labelled_fraction`) leaves, its labels dropped."""

    train: list[Record]
    eval: list[Record]
    test: list[Record]
    unlabeled: Sequence[Record] = ()


def _read(path: Path, cfg: DataConfig) -> list[Record]:
    return read_records(
        path, cfg.format, cfg.text_column, cfg.label_column,
        token_column=cfg.token_column, tag_column=cfg.tag_column, require_label=not cfg.unlabeled,
        source_column=cfg.source_column, target_column=cfg.target_column, image_column=cfg.image_column,
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
    (smoke runs). Then `labels_per_class` / `labelled_fraction` keep the labels of a few training
    records (`few_label_split`) and make the rest the unlabeled pool.
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
    if cfg.unlabeled:
        if cfg.labels_per_class or cfg.labelled_fraction:
            raise ConfigError("data.unlabeled drops every label; data.labels_per_class / labelled_fraction keep some",
                              "keep one of them")
        train, eval_, test = (_without_labels(part) for part in (train, eval_, test))
        return Splits(train, eval_, test)
    if cfg.labels_per_class and cfg.labelled_fraction:
        raise ConfigError("data.labels_per_class and data.labelled_fraction are both set", "keep one of them")
    if cfg.labels_per_class or cfg.labelled_fraction:
        train, unlabeled = few_label_split(train, cfg.labels_per_class, cfg.labelled_fraction, cfg.seed)
        return Splits(train, eval_, test, unlabeled)
    return Splits(train, eval_, test)


def few_label_split(records: list[Record], per_class: int | None = None, fraction: float | None = None,
                    seed: int = 0) -> tuple[list[Record], list[Record]]:
    """The labelled few and the unlabeled rest of `records`, seeded and stratified by label.

    Args:
        records: labelled training records.
        per_class: keep exactly this many labelled records of every class.
        fraction: else keep this fraction of the records, each class in proportion.
        seed: the same seed gives the same split.

    Returns:
        `(labelled, unlabeled)`: the kept records as they are, and the others without their
        `label` (nothing downstream can read it).

    Raises:
        DataError: a class has fewer than `per_class` records.
    """
    labels = list(iter_labels(records))
    if per_class:
        order = stratified_split(labels, [], seed)[0]  # the seeded order every split of this seed shares
        by_class: dict[str, list[int]] = defaultdict(list)
        for i in order:
            by_class[str(labels[i])].append(i)
        short = {label: len(ix) for label, ix in by_class.items() if len(ix) < per_class}
        if short:
            label, n = min(short.items(), key=lambda kv: kv[1])
            raise DataError(f"data.labels_per_class: class {label!r} has only {n} training records, not {per_class}",
                            "lower data.labels_per_class (or data.limit cut the training split)")
        rank = {i: n for n, i in enumerate(order)}
        kept = sorted((i for ix in by_class.values() for i in ix[:per_class]), key=rank.__getitem__)
    else:
        kept = stratified_split(labels, [float(fraction)], seed)[1]
    chosen = set(kept)
    pool = [{k: v for k, v in r.items() if k != "label"} for i, r in enumerate(records) if i not in chosen]
    return [records[i] for i in kept], pool


def _without_labels(records: list[Record] | None) -> list[Record] | None:
    """The records without their targets: what self-supervised pretraining may see of a labelled set.

    Tagged sentences (`tokens`) become text too: their words joined by spaces.
    """
    if records is None:
        return None
    out = []
    for r in records:
        kept = {k: v for k, v in r.items() if k not in ("label", "tags")}
        if "text" not in kept and isinstance(kept.get("tokens"), list):
            kept["text"] = " ".join(kept["tokens"])
        out.append(kept)
    return out


def _sample(records: list[Record], limit: int, seed: int) -> list[Record]:
    """At most `limit` records, a seeded sample stratified by label: a data set stored in class
    order (Fashion-MNIST's files, a CSV sorted by label) still gives a smoke run every class."""
    if len(records) <= limit:
        return records
    return [records[i] for i in stratified_split(list(iter_labels(records)), [limit], seed)[1]]
