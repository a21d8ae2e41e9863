"""Lazy package attributes (PEP 562), so light imports never pull in torch, FastAPI or numpy."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that resolves `name` through `table` ("module:attribute") on first use.

    Args:
        package: the package's dotted name, for the AttributeError message.
        table: public name → "module:attribute".
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = target.partition(":")
        value = getattr(importlib.import_module(module), attr)
        namespace[name] = value  # cache: later lookups skip __getattr__
        return value

    return __getattr__
