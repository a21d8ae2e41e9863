"""The model server: `dapeng serve` on FastAPI + uvicorn, with dynamic batching.

    from dapeng.serve import ServeConfig, create_app
    app = create_app({"rt": dapeng.load("runs/rt")}, ServeConfig(max_batch_size=32))

Names load lazily, so importing `dapeng.serve.batcher` does not pull in FastAPI.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "create_app": "dapeng.serve.app:create_app",
    "ServeConfig": "dapeng.serve.config:ServeConfig",
    "DynamicBatcher": "dapeng.serve.batcher:DynamicBatcher",
    "serve": "dapeng.serve.server:serve",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'dapeng.serve' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
