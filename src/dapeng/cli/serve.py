"""`dapeng serve RUN_OR_NAME [more…]`: serve models over HTTP with dynamic batching."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dapeng.errors import DapengError

EXAMPLE = """example:
  dapeng serve runs/rt                          # http://127.0.0.1:8000/v1/models/rt:predict
  dapeng serve sentiment=runs/rt minilm-l6 --port 9000 --max-batch-size 64
  DAPENG_API_KEY=secret dapeng serve runs/rt --host 0.0.0.0 --workers 2
  dapeng export runs/rt --format onnx && dapeng serve runs/rt --backend onnxruntime

  curl -s localhost:8000/v1/models/rt:predict -d '{"instances": ["a gripping film"]}'
  curl -s localhost:8000/v2/models/rt/infer \\
    -d '{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a gripping film"]}]}'"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve models over HTTP (KServe V1 and V2, OpenAI completions and embeddings) with dynamic batching",
        description=(
            "Serve one or more models: run directories, Artifact folders or hub names. "
            "Each is served under its folder or hub name, or NAME=SOURCE to choose, on the routes its task "
            "supports (GET /v1/models/NAME lists its capabilities). "
            "SIGINT/SIGTERM finish in-flight requests before exiting."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="RUN_OR_NAME", help="[NAME=]run dir, Artifact folder or hub name")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port, each with its own models")
    p.add_argument("--max-batch-size", type=int, default=32, help="most items per forward pass; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest wait for answered callers to come back before a batch starts (default 5)")
    p.add_argument("--max-queue", type=int, default=1024, help="items waiting per model before 503 (default 1024)")
    p.add_argument("--max-items", type=int, default=64, help="most instances per request")
    p.add_argument("--max-body-bytes", type=int, default=2_000_000, help="largest request body")
    p.add_argument("--max-input-chars", type=int, default=20_000, help="longest text input")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request time limit in seconds (then 504)")
    p.add_argument("--api-key", default=None, help="require this key (Bearer or X-API-Key); default $DAPENG_API_KEY")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: half the cores, shared among workers)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="forward-pass precision (default: each model's training precision, else auto)")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="run the forward pass in PyTorch or ONNX Runtime (a run's `dapeng export` folder); "
                        "auto: ONNX Runtime for export folders")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    return p


def model_sources(specs: list[str]) -> dict[str, str]:
    """NAME → source for each `[NAME=]SOURCE`; names default to the folder (the run, for RUN/model) or hub name."""
    sources: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            source, name = spec, _default_name(spec)
        if name in sources:
            raise DapengError(f"two models are named {name!r}", "name them apart: NAME=SOURCE")
        sources[name] = source
    return sources


def _default_name(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        path = path.resolve()
        inner = path.name in ("model", "export-onnx") and (path / "dapeng.json").is_file()
        return path.parent.name if inner else path.name
    return source.partition("@")[0]


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from dapeng.serve.config import API_KEY_ENV, ServeConfig, default_torch_threads
    from dapeng.serve.server import serve

    if args.workers < 1:
        raise DapengError(f"--workers must be at least 1, not {args.workers}")
    threads = args.threads or max(1, default_torch_threads() // args.workers)
    try:
        config = ServeConfig(
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
            max_items=args.max_items,
            max_body_bytes=args.max_body_bytes,
            max_input_chars=args.max_input_chars,
            timeout_s=args.timeout,
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
            torch_threads=threads,
        )
    except ValidationError as err:
        first = err.errors()[0]
        raise DapengError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg'].lower()}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"dapeng serve: warning: listening on {args.host} without an API key", flush=True)
    serve(model_sources(args.models), config, host=args.host, port=args.port, workers=args.workers,
          precision=args.precision, backend=args.backend, log_level=args.log_level, access_log=args.access_log)
    return 0
