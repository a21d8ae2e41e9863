"""Explicit registries (timm's `register_model` / `create_model`).

Entries are registered from one explicit table per package as "module:attribute"
strings, so listing names never imports the heavy modules behind them.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from dapeng.errors import NotFoundError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → factory table.

    Args:
        kind: what the entries are ("model", "task", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T] | str] = {}

    def register(self, name: str, target: Callable[..., T] | str | None = None) -> Any:
        """Register `target` (a callable or a lazy "module:attr" path) under `name`.

        Used bare as a decorator when `target` is omitted: `@MODELS.register("lstm")`.
        """
        if target is not None:
            self._entries[name] = target
            return target

        def decorator(fn: Callable[..., T]) -> Callable[..., T]:
            self._entries[name] = fn
            return fn

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as `name`; raises NotFoundError naming the close matches."""
        try:
            entry = self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"choose one of: {', '.join(self.names())}"
            raise NotFoundError(f"unknown {self.kind} {name!r}", hint) from None
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)
