"""The errors dapeng raises for bad input. The CLI prints `str(error)` on one line and exits 2."""

from __future__ import annotations


class DapengError(Exception):
    """Base class: a problem with the user's input, files or environment, with a hint of what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} — {hint}" if hint else message)


class ConfigError(DapengError):
    """A config key that is unknown, missing or of the wrong type."""


class DataError(DapengError):
    """A missing, empty or malformed data file, or an unknown data set."""


class ModelError(DapengError):
    """An unknown model name, bad model arguments, or weights that don't match the model."""


class CheckpointError(DapengError):
    """A missing, truncated or corrupt checkpoint or Artifact."""


class NotFoundError(DapengError):
    """A name (model, task, data set, hub entry) that isn't registered."""
