"""The model server: `dapeng serve` on FastAPI + uvicorn, with dynamic batching.

    from dapeng.serve import ServeConfig, create_app
    app = create_app({"rt": dapeng.load("runs/rt")}, ServeConfig(max_batch_size=32))

Names load lazily, so importing `dapeng.serve.batcher` does not pull in FastAPI.
"""

from __future__ import annotations

from dapeng._lazy import lazy_getattr

_LAZY = {
    "create_app": "dapeng.serve.app:create_app",
    "ServeConfig": "dapeng.serve.config:ServeConfig",
    "DynamicBatcher": "dapeng.serve.batcher:DynamicBatcher",
    "serve": "dapeng.serve.server:serve",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
