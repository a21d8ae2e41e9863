"""Running the app under uvicorn: one process, or `workers` processes sharing one socket.

With several workers each process loads its own copy of every model (uvicorn spawns
them), so the models to load travel as a small JSON spec in an environment variable
and `app_from_env` rebuilds the app in each worker.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping

from fastapi import FastAPI

from dapeng.serve.config import ServeConfig

__all__ = ["SPEC_ENV", "app_from_env", "load_app", "serve"]

SPEC_ENV = "DAPENG_SERVE_SPEC"


def load_app(models: Mapping[str, str], config: ServeConfig, precision: str | None = None,
             backend: str = "auto") -> FastAPI:
    """Load every model (name → run dir, Artifact folder, ONNX export or hub name) and build the app."""
    from dapeng.pipeline import load
    from dapeng.serve.app import create_app

    pipelines = {name: load(source, precision=precision, backend=backend) for name, source in models.items()}
    for name, pipeline in pipelines.items():
        pipeline.name = name
    return create_app(pipelines, config)


def app_from_env() -> FastAPI:
    """The app described by `$DAPENG_SERVE_SPEC` (set by `serve` for its worker processes)."""
    spec = json.loads(os.environ[SPEC_ENV])
    return load_app(spec["models"], ServeConfig(**spec["config"]), spec["precision"], spec.get("backend", "auto"))


def serve(
    models: Mapping[str, str],
    config: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    precision: str | None = None,
    backend: str = "auto",
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve `models` until SIGINT/SIGTERM, then finish in-flight requests and exit.

    Args:
        models: model name → run dir, Artifact folder or hub name.
        config: batching, limits, API key and torch threads (per worker).
        host: the interface to bind; 127.0.0.1 unless you mean to expose the server.
        workers: processes sharing the port, each with its own models and batchers.
        backend: `auto`, `torch` or `onnxruntime` (`dapeng.load`).
    """
    import uvicorn

    # In-flight requests may take up to the request time limit; give them that, plus a margin.
    options = {
        "host": host,
        "port": port,
        "log_level": log_level,
        "access_log": access_log,
        "timeout_graceful_shutdown": int(config.timeout_s) + 5,
        "server_header": False,
    }
    if workers > 1:
        os.environ[SPEC_ENV] = json.dumps(
            {"models": dict(models), "config": config.model_dump(), "precision": precision, "backend": backend}
        )
        uvicorn.run("dapeng.serve.server:app_from_env", factory=True, workers=workers, **options)
        return
    server = uvicorn.Server(uvicorn.Config(load_app(models, config, precision, backend), **options))
    # Uvicorn shuts down gracefully on SIGINT, then re-raises it: by then the stop is a clean one.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
