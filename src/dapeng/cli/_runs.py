"""What the compress verbs share: a run's float model and its encoded splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple


class LoadedRun(NamedTuple):
    artifact: Any  # dapeng.hub.artifact.Artifact of RUN/model, in fp32
    config: Any  # the run's RunConfig
    splits: Any  # its records: .train, .eval, .test


def load_run(run: Path) -> LoadedRun:
    """RUN/model (fp32) with the run's config and records.

    Raises:
        CheckpointError: `run` is not a run directory (the compress verbs need its data).
    """
    from dapeng.hub.artifact import load_artifact
    from dapeng.runner import load_run_config, load_splits

    config = load_run_config(run)
    return LoadedRun(load_artifact(Path(run) / "model", precision="fp32"), config, load_splits(config))


def encoded(loaded: LoadedRun, split: str, limit: int | None = None) -> list[Any]:
    """The first `limit` records of a split (all by default), encoded by the model's own task.

    Raises:
        ConfigError: the run's data has no such split.
    """
    from dapeng.errors import ConfigError

    records = getattr(loaded.splits, split) or []
    if not records:
        raise ConfigError(f"the run's data has no {split!r} split", "pass --split with a split the run has")
    return loaded.artifact.task.encode(list(records[:limit] if limit else records))
