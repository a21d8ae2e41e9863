"""The HTTP server: KServe V1 and V2 endpoints, OpenAI completions and embeddings, health and metrics.

    app = create_app({"rt": dapeng.load("runs/rt")}, ServeConfig(max_batch_size=32))

Every model gets a `DynamicBatcher` and one worker thread; the event loop only parses,
validates and answers. Which routes serve a model follows its task's declared
`Capabilities` (a verb it lacks is a 4xx naming the routes it has). Bad input is a 4xx that
says what is wrong (422 naming the field, 404 for an unknown model, 413 for a body too
large); a full queue is a 503 with `Retry-After`; a request over its time limit is a 504.
A 500 means a bug, never bad input. The OpenAI routes answer errors in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`), so its clients show the message, and
the V2 routes in V2's (`{"error": "..."}`, 400 for a bad request). Generation is
continuously batched (`scheduler.GenerationScheduler`) for models that support it.

Each route is one piece of code, whatever its way in: `_Gate` checks the API key, refuses
work while draining and records metrics for all of them; the model POST routes are
`_LeanRoute`s, documented in the OpenAPI spec from their endpoints and dispatched to
directly by the gate, past FastAPI's per-request machinery.

(No `from __future__ import annotations` here: FastAPI reads the request-body classes,
which `build_request_models` makes at run time, from the handlers' live annotations.)
"""

import asyncio
import contextlib
import inspect
import json
import logging
import re
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from dapeng import __version__
from dapeng.errors import DapengError, NotFoundError
from dapeng.serve import v2
from dapeng.serve.batcher import BatcherStopped, DynamicBatcher, QueueFull
from dapeng.serve.config import ServeConfig
from dapeng.serve.metrics import Metrics
from dapeng.serve.scheduler import Event, GenerationScheduler, Sequence, can_schedule
from dapeng.serve.schemas import (
    Batching,
    ChatCompletion,
    Completion,
    EmbeddingList,
    ErrorBody,
    ExplainResponse,
    ModelInfo,
    ModelList,
    OpenAIErrorBody,
    Status,
    V2Error,
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
    build_request_models,
    predict_response,
)

__all__ = ["ServeState", "create_app"]

log = logging.getLogger("dapeng.serve")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
_MODEL_PATH = re.compile(r"^(/v1/models/|/v2/models/)([^/:]+)(:\w+|/ready|/infer)?$")
_UNGUARDED = ("/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready")
_OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms).
# The model's worker thread takes the GIL back between torch ops; while the event loop is
# busy answering a burst of requests, each of those waits could last the whole interval.
# Measured with a forward pass of batch 32 beside a thread busy 30% of the time: the
# worker waited ~25% of its wall time at 5 ms, ~8% at 1 ms.
_SWITCH_INTERVAL_S = 0.001


def _error(code: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": description}}


_NOT_FOUND = _error(404, "unknown model")
_BUSY = _error(503, "queue full or shutting down; retry after the Retry-After header's seconds")
_TIMEOUT = _error(504, "the request ran past the server's time limit")
_TOO_LARGE = _error(413, "request body larger than the server accepts")


class _ApiError(Exception):
    """An HTTP error with the usual `{"detail": ...}` body and optional headers."""

    def __init__(
        self, status: int, detail: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        self.status = status
        self.detail = detail
        self.headers = headers
        self.param = param


def _invalid(loc: Iterable[Any], message: str, where: str = "body") -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": (where, *loc), "msg": message, "input": None}]
    )


# The routes that serve each verb, for the hint in an "unsupported" error.
_ROUTES = {
    "predict": "/v1/models/{name}:predict or /v2/models/{name}/infer",
    "generate": "/v1/completions or /v1/chat/completions",
    "embed": "/v1/embeddings",
    "explain": "/v1/models/{name}:explain",
}


@dataclass
class ModelSlot:
    """One served model: its pipeline, its worker thread, its batcher and (LMs) its generation scheduler."""

    name: str
    pipeline: Any
    capabilities: Any
    executor: ThreadPoolExecutor
    batcher: DynamicBatcher
    scheduler: GenerationScheduler | None = None
    created: int = 0

    @property
    def generates(self) -> bool:
        return self.capabilities.supports("generate")

    @property
    def embeds(self) -> bool:
        return self.capabilities.supports("embed")

    @property
    def task_name(self) -> str:
        return str(getattr(self.pipeline, "task_name", "") or "")

    def require(self, verb: str, param: str, where: str = "body") -> None:
        """422 naming `param` unless the model's task declares `verb`; the message lists what it can do."""
        caps = self.capabilities
        if caps.supports(verb):
            return
        routes = [_ROUTES[v].format(name=self.name) for v in ("predict", "generate", "embed", "explain")
                  if caps.supports(v)]
        verbs = ", ".join(v for v in _ROUTES if caps.supports(v)) or "nothing"
        raise _invalid((param,), f"model {self.name!r} (task {self.task_name!r}) can't {verb}; it supports: "
                       f"{verbs}" + (f" (use {'; '.join(routes)})" if routes else ""), where=where)

    def require_method(self, method: str) -> None:
        """422 naming `method` unless the task declares that explanation method."""
        self.require("explain", "name", where="path")
        if method not in self.capabilities.explain:
            raise _invalid(("method",), f"model {self.name!r} (task {self.task_name!r}) has no {method!r} "
                           f"explanations; choose one of: {', '.join(self.capabilities.explain)}")

    def records(
        self, instances: list[Any], config: ServeConfig, verb: str = "predict", param: str = "instances"
    ) -> list[Any]:
        """Validated records for `instances` to `verb` (422 naming `param`'s bad one, or the verb)."""
        self.require(verb, "name", where="path")
        to_records = getattr(self.pipeline, "to_records", None)
        try:
            if callable(to_records):
                return to_records(instances, max_chars=config.max_input_chars, allow_paths=False)
        except DapengError as err:
            raise _invalid((param, *getattr(err, "loc", ())), str(err)) from None
        for i, value in enumerate(instances):
            if isinstance(value, str) and len(value) > config.max_input_chars:
                raise _invalid((param, i), f"input {i} is longer than {config.max_input_chars} characters")
        return instances

    @property
    def labels(self) -> list[str] | None:
        labels = getattr(self.pipeline, "labels", None)
        return [str(x) for x in labels] if labels else None

    def info(self) -> ModelInfo:
        return ModelInfo(
            id=self.name,
            created=self.created,
            name=self.name,
            ready=True,
            task=self.task_name,
            labels=self.labels,
            precision=getattr(self.pipeline, "precision", None),
            capabilities=self.capabilities.to_dict(),
            generates=self.generates,
            embeds=self.embeds,
            batching=Batching(
                max_batch_size=self.batcher.max_batch_size, max_wait_ms=self.batcher.max_wait * 1000
            ),
        )


class ServeState:
    """Everything one app serves: models, settings, metrics, and whether it is draining."""

    def __init__(self, pipelines: Mapping[str, Any], config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.draining = False
        self.started = False
        self._switch_interval: float | None = None
        self.slots: dict[str, ModelSlot] = {}
        for name, pipeline in pipelines.items():
            if not _NAME.match(name):
                raise DapengError(f"bad model name {name!r}", "use letters, digits, '.', '_', '@' and '-'")
            self.slots[name] = self._slot(name, pipeline)

    def _slot(self, name: str, pipeline: Any) -> ModelSlot:
        from dapeng.pipeline import to_json
        from dapeng.tasks.base import capabilities_of

        # The routes follow the task's declaration; an object without one is a programming error.
        capabilities = capabilities_of(pipeline)
        # The worker sets torch's thread count itself too: OpenMP keeps that setting per thread.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dapeng-{name}",
                                      initializer=_set_torch_threads, initargs=(self.config.torch_threads,))
        batch_size = self.config.max_batch_size
        # Records arrive checked by `ModelSlot.records`: a Pipeline predicts them without reading them again.
        def predict(records: list[Any]) -> list[Any]:
            # JSON conversion runs here, in the worker, to keep it off the event loop.
            run = getattr(pipeline, "predict_records", None) or pipeline.predict
            return to_json(run(records, batch_size=max(batch_size, len(records))))

        batcher = DynamicBatcher(
            predict,
            executor,
            max_batch_size=batch_size,
            max_wait_ms=self.config.max_wait_ms,
            max_queue=self.config.max_queue,
            on_batch=lambda size, seconds: self.metrics.observe_batch(name, size, seconds),
        )
        scheduler = None
        if capabilities.supports("generate") and can_schedule(pipeline):
            scheduler = GenerationScheduler(
                pipeline, executor, max_batch_size=batch_size, max_queue=self.config.max_queue,
                on_step=lambda size, seconds: self.metrics.observe_decode_step(name, size, seconds),
                on_token=lambda seconds, first: self.metrics.observe_token(name, seconds, first),
            )
            self.metrics.track_queue(name, lambda: scheduler.queue_depth, lambda: scheduler.in_flight)
        else:
            self.metrics.track_queue(name, lambda: batcher.queue_depth, lambda: batcher.in_flight)
        return ModelSlot(name, pipeline, capabilities, executor, batcher, scheduler, int(time.time()))

    def slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            raise _ApiError(404, f"unknown model {name!r}; served: {', '.join(sorted(self.slots)) or 'none'}",
                            param="model")
        return slot

    async def start(self) -> None:
        _set_torch_threads(self.config.torch_threads)
        if sys.getswitchinterval() > _SWITCH_INTERVAL_S:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
        for slot in self.slots.values():
            slot.batcher.start()
        self.started = True

    async def stop(self) -> None:
        """Finish accepted work, then release the worker threads."""
        self.draining = True
        for slot in self.slots.values():
            if slot.scheduler is not None:
                slot.scheduler.close()
        await asyncio.gather(*(slot.batcher.stop() for slot in self.slots.values()))
        for slot in self.slots.values():
            slot.executor.shutdown(wait=True)
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    def begin_drain(self) -> None:
        """Refuse new requests (503) and report not-ready, while accepted ones finish."""
        self.draining = True


def _set_torch_threads(threads: int) -> None:
    """Give torch a fixed share of the cores, so the HTTP side keeps CPU to answer with."""
    import torch

    torch.set_num_threads(threads)


def _hook_termination(state: ServeState) -> Callable[[], None]:
    """Mark the app as draining as soon as SIGTERM/SIGINT arrive, then let uvicorn shut down.

    Uvicorn closes the listening socket and waits for in-flight requests; draining also
    answers 503 on connections that are kept alive, and turns /ready to 503 so a load
    balancer stops sending work. Only the main thread may set signal handlers; elsewhere
    (a server run in a thread) this does nothing and `begin_drain` is called directly.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig: int, frame: Any) -> None:
        state.begin_drain()
        prior = previous[signal.Signals(sig)]
        if callable(prior):
            prior(sig, frame)

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, prior in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, prior)

    return restore


def create_app(pipelines: Mapping[str, Any], config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving `pipelines` (name → a `dapeng.Pipeline`, or any object with its interface).

    Each model's routes follow its task's declared `capabilities`: `:predict` and V2 `infer`
    for the `predict` verb, `:explain` for `explain` (its methods), `/v1/embeddings` for
    `embed`, the completion routes for `generate`.

    Args:
        pipelines: the models to serve by name; `dapeng.Pipeline`s, or objects with a
            `capabilities` (`dapeng.tasks.base.Capabilities`) and the methods its verbs name
            (`predict(records, batch_size=...)` giving one JSON-able output per record, ...).
        config: batching, limits and the API key.
    """
    config = config or ServeConfig()
    state = ServeState(pipelines, config)
    bodies = build_request_models(config, [s.capabilities.input_schema() for s in state.slots.values()
                                           if s.capabilities.supports("predict")])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        restore = _hook_termination(state)
        try:
            yield
        finally:
            restore()
            await state.stop()

    app = _GatedApp(
        state,
        title="dapeng model server",
        version=__version__,
        description="KServe V1 and V2 prediction, explanations, OpenAI-compatible completions and embeddings.",
        lifespan=lifespan,
        max_body_size=config.max_body_bytes,
    )
    app.state.serve = state
    _install_error_handlers(app)

    # The gate checks the key on every route but the open ones; these only put it in the OpenAPI document.
    security = [Depends(HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")),
                Depends(APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key"))]
    guarded: dict[str, Any] = (
        {"dependencies": security, "responses": _error(401, "missing or wrong API key")} if config.api_key else {}
    )
    models = APIRouter(**guarded)
    _add_model_routes(app, models, state, bodies, guarded)
    _add_openai_routes(models, state, bodies)
    app.include_router(models)
    _add_ops_routes(app, state)
    return app


def _require_key(key: str, given: list[str | None]) -> None:
    if not any(g is not None and secrets.compare_digest(g.encode(), key.encode()) for g in given):
        raise _ApiError(401, "missing or wrong API key", {"WWW-Authenticate": "Bearer"})


def _keys_in(headers: list[tuple[bytes, bytes]]) -> list[str | None]:
    """The API keys a raw ASGI request offers: `X-API-Key` and `Authorization: Bearer`."""
    found: list[str | None] = []
    for name, value in headers:
        if name == b"x-api-key":
            found.append(value.decode("latin-1"))
        elif name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                found.append(token.strip())
    return found


def _error_response(path: str, exc: _ApiError | RequestValidationError) -> tuple[int, dict[str, Any], Any]:
    """Status, body and headers answering `exc` on `path`, in that protocol's error shape.

    V1 routes answer FastAPI's `{"detail": ...}` (a list of `{loc, msg, ...}` for a bad
    request, 422); the OpenAI routes OpenAI's `{"error": {...}}`; the V2 routes
    `{"error": "..."}`, a bad request there being a 400 as the protocol has it.
    """
    v2 = path.startswith("/v2")
    if isinstance(exc, _ApiError):
        if path in _OPENAI_PATHS:
            return exc.status, _openai_error(exc.status, exc.detail, exc.param), exc.headers
        return exc.status, {"error": exc.detail} if v2 else {"detail": exc.detail}, exc.headers
    errors = exc.errors()
    if path not in _OPENAI_PATHS and not v2:
        return 422, {"detail": jsonable_encoder(errors)}, None
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "path")]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    if v2:
        return 400, {"error": message}, None
    return 422, _openai_error(422, message, param), None


def _install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, _ApiError | RequestValidationError)
        status, body, headers = _error_response(request.url.path, exc)
        return JSONResponse(body, status_code=status, headers=headers)

    app.add_exception_handler(_ApiError, handle)
    app.add_exception_handler(RequestValidationError, handle)


def _openai_error(status: int, message: str, param: str | None) -> dict[str, Any]:
    """OpenAI's error body: its clients raise an error carrying `message`."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {404: "model_not_found", 401: "invalid_api_key", 503: "overloaded", 504: "timeout"}.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _GatedApp(FastAPI):
    """FastAPI with `_Gate` in front of its whole stack, not inside it as a middleware."""

    def __init__(self, state: ServeState, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lean_routes: list[_LeanRoute] = []
        self._gate = _Gate(super().__call__, state, self.lean_routes, self.openapi_url, self.docs_url,
                           self.redoc_url, self.swagger_ui_oauth2_redirect_url)

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        await self._gate(scope, receive, send)


class _Gate:
    """Pure ASGI middleware (no per-request task, unlike `@app.middleware`) in front of every
    route: checks the API key, refuses work while draining, and records request metrics.

    It also hands a request for one of the `_LeanRoute`s (the model POST routes) straight to
    that route, past FastAPI's outer layers (the OpenTelemetry check, error and body-limit
    middleware, route matching): ~100 µs of event-loop CPU a request here, about a fifth of
    what the server spends on a prediction. The route is the one the router would pick and
    needs none of those layers: it limits the body and answers its errors itself.
    """

    def __init__(self, app: Any, state: ServeState, lean_routes: list[Any], *open_paths: str | None) -> None:
        self.app = app
        self.state = state
        self.lean_routes = lean_routes
        self.open_paths = {*_UNGUARDED, *(p for p in open_paths if p)}

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, config = self.state, self.state.config
        path: str = scope["path"]
        start = time.perf_counter()
        status = [500]

        async def send_and_record(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if path not in self.open_paths:
                if config.api_key:
                    _require_key(config.api_key, _keys_in(scope["headers"]))
                if state.draining:
                    raise _ApiError(503, "shutting down", {"Retry-After": str(config.retry_after_s),
                                                           "Connection": "close"})
            await self._dispatch(scope, receive, send_and_record)
        except _ApiError as err:
            await _reply(send_and_record, *_error_response(path, err))
        finally:
            endpoint, model = _labels(path, state)
            state.metrics.observe_request(endpoint, model, status[0], time.perf_counter() - start)

    async def _dispatch(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["method"] == "POST":
            for route in self.lean_routes:
                # The route's own pattern; its parameters are plain strings, as the router would give them.
                if match := route.path_regex.match(scope["path"]):
                    scope["path_params"] = match.groupdict()
                    await route.serve(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class _LeanRoute(APIRoute):
    """A JSON POST route documented from its endpoint like any other, served without FastAPI's
    request machinery.

    FastAPI's dependency solving, body parsing and response validation cost ~1 ms of CPU a
    request here, more than a batched forward pass costs per item. This route reads the body
    itself (with the size limit), validates it with the pydantic model its endpoint declares
    as `body` (the one the OpenAPI document shows), calls the endpoint with the path's
    parameters, and writes the dict it returns as JSON; errors get `_error_response`'s
    shapes, as on every other route. Auth, draining and metrics are the gate's.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], *, limit: int,
                 binary: Callable[[Any, bytes], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(path, endpoint, methods=["POST"], **kwargs)
        self.body_model = inspect.signature(endpoint).parameters["body"].annotation
        self.limit = limit
        self.binary = binary
        self.app = self.serve

    def parse(self, raw: bytes, headers: list[tuple[bytes, bytes]]) -> Any:
        """The body: JSON, or (V2's binary extension) JSON of the header's length, then binary data."""
        size = next((v for k, v in headers if k == v2.BINARY_HEADER), None) if self.binary else None
        if size is not None and not (size.isdigit() and int(size) <= len(raw)):
            raise _invalid((), f"{v2.BINARY_HEADER.decode()} {size.decode('latin-1')!r} is not a length within the body")
        end = len(raw) if size is None else int(size)
        try:
            body = self.body_model.model_validate_json(raw[:end])
        except ValidationError as err:
            # A body that is not JSON (or not UTF-8) comes back as its raw bytes: don't echo them.
            raise RequestValidationError([
                {**e, "loc": ("body", *e["loc"]), "input": None if isinstance(e["input"], bytes) else e["input"]}
                for e in err.errors(include_url=False)
            ]) from None
        if size is None or self.binary is None:
            return body
        try:
            return self.binary(body, raw[end:])
        except DapengError as err:
            raise _invalid((), str(err)) from None

    async def serve(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        try:
            raw = await _read_body(scope, receive, self.limit)
            if raw is None:  # the client went away
                return
            body = self.parse(raw, scope["headers"])
            content = await self.endpoint(**scope["path_params"], body=body)
        except (_ApiError, RequestValidationError) as err:
            await _reply(send, *_error_response(scope["path"], err))
            return
        await _reply(send, 200, content)


async def _read_body(scope: dict[str, Any], receive: Callable[..., Any], limit: int) -> bytes | None:
    """The whole request body, or None on disconnect; past `limit` bytes a 413 (chunked bodies too)."""
    for key, value in scope["headers"]:
        if key == b"content-length" and value.isdigit() and int(value) > limit:
            raise _ApiError(413, f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _ApiError(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _reply(
    send: Callable[..., Any], status: int, content: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(content).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _labels(path: str, state: ServeState) -> tuple[str, str]:
    """Metric labels for `path`, bounded: unknown models and paths share one label each."""
    match = _MODEL_PATH.match(path)
    if match:
        model = match.group(2) if match.group(2) in state.slots else "unknown"
        return f"{match.group(1)}{{name}}{match.group(3) or ''}", model
    if path in ("/v1/models", "/v2", *_OPENAI_PATHS, *_UNGUARDED):
        return path, ""
    return "other", ""


def _busy(config: ServeConfig, detail: str) -> _ApiError:
    return _ApiError(503, detail, {"Retry-After": str(config.retry_after_s)})


async def _submit(state: ServeState, slot: ModelSlot, records: list[Any], param: str = "instances") -> list[Any]:
    try:
        return await slot.batcher.submit(records, timeout=state.config.timeout_s)
    except QueueFull as err:
        raise _busy(state.config, str(err)) from None
    except BatcherStopped as err:
        raise _busy(state.config, str(err)) from None
    except TimeoutError:
        raise _ApiError(504, f"no answer within {state.config.timeout_s:g} s") from None
    except DapengError as err:
        raise _invalid((param,), str(err)) from None


def _add_model_routes(app: _GatedApp, router: APIRouter, state: ServeState, bodies: Any,
                      guarded: dict[str, Any]) -> None:
    config = state.config
    PredictRequest, ExplainRequest = bodies.predict, bodies.explain  # noqa: N806 (pydantic classes)
    errors = {**_NOT_FOUND, **_TOO_LARGE, **_BUSY, **_TIMEOUT, **guarded.get("responses", {})}
    schemas = [s.capabilities.output_schema for s in state.slots.values() if s.capabilities.supports("predict")]

    def lean(path: str, response_model: Any, tags: list[str], responses: dict[Any, Any],
             binary: Callable[[Any, bytes], Any] | None = None) -> Callable[..., Any]:
        def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
            route = _LeanRoute(path, endpoint, limit=config.max_body_bytes, binary=binary,
                               response_model=response_model, responses=responses, tags=tags,
                               dependencies=guarded.get("dependencies"))
            app.router.routes.append(route)
            app.lean_routes.append(route)
            return endpoint

        return register

    @router.get("/v1/models", response_model=ModelList, tags=["models"])
    async def list_models() -> ModelList:
        """The served models."""
        infos = [slot.info() for slot in state.slots.values()]
        return ModelList(data=infos, models=infos)

    @router.get("/v1/models/{name}", response_model=ModelInfo, responses=_NOT_FOUND, tags=["models"])
    async def model_info(name: str) -> ModelInfo:
        """One model: its task, capabilities, labels, precision and batching."""
        return state.slot(name).info()

    @lean("/v1/models/{name}:predict", predict_response(schemas), ["models"], errors)
    async def predict(name: str, body: PredictRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """Predict for each instance (KServe / TF-Serving V1), batched with other requests."""
        slot = state.slot(name)
        records = slot.records(body.instances, config)  # type: ignore[attr-defined]
        return {"predictions": await _submit(state, slot, records)}

    @lean("/v1/models/{name}:explain", ExplainResponse, ["models"], errors)
    async def explain(name: str, body: ExplainRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """Explain each instance's prediction (attributions or attention maps)."""
        from dapeng.pipeline import to_json

        slot = state.slot(name)
        slot.require_method(body.method)  # type: ignore[attr-defined]
        records = slot.records(body.instances, config, "explain")  # type: ignore[attr-defined]
        field = slot.capabilities.input
        # an image+text input is its record ({"image", "text"}); others are the record's one field
        inputs = [r[field] if isinstance(r, dict) and field in r else r for r in records]

        def run() -> Any:
            return to_json(slot.pipeline.explain(inputs, method=body.method, target=body.target))  # type: ignore[attr-defined]

        # The method is checked above; explain's NotFoundError is a target the model doesn't have.
        result = await _in_worker(state, slot, run,
                                  lambda err: ("target",) if isinstance(err, NotFoundError) else ("method",))
        items = result if isinstance(result, list) else [result]
        return {"explanations": [x if isinstance(x, dict) else {"value": x} for x in items]}

    _add_v2_routes(app, router, state, lean, errors)


def _add_v2_routes(app: _GatedApp, router: APIRouter, state: ServeState, lean: Callable[..., Any],
                   errors: dict[Any, Any]) -> None:
    """KServe V2 / Open Inference Protocol: health, metadata and `infer` through the V1 batcher."""
    v2_errors = {code: {**spec, "model": V2Error} for code, spec in errors.items()}
    v2_errors[400] = {"model": V2Error, "description": "a bad request (the Open Inference Protocol's 400)"}

    @app.get("/v2/health/live", response_model=V2Live, tags=["v2"])
    async def live() -> V2Live:
        """Liveness: the process answers."""
        return V2Live(live=True)

    @app.get("/v2/health/ready", response_model=V2Ready, responses={503: {"model": V2Ready}}, tags=["v2"])
    async def ready() -> Any:
        """Readiness: models loaded and not shutting down."""
        if state.draining or not state.started:
            return JSONResponse({"ready": False}, status_code=503)
        return V2Ready(ready=True)

    @router.get("/v2", response_model=V2ServerMetadata, tags=["v2"])
    async def server_metadata() -> V2ServerMetadata:
        """The server's name, version and protocol extensions (none)."""
        return V2ServerMetadata(name="dapeng", version=__version__, extensions=[])

    def predicting(name: str) -> ModelSlot:
        slot = state.slot(name)
        slot.require("predict", "name", where="path")
        return slot

    @router.get("/v2/models/{name}", response_model=V2ModelMetadata, responses=v2_errors, tags=["v2"])
    async def model_metadata(name: str) -> V2ModelMetadata:
        """A model's input and output tensors."""
        slot = predicting(name)
        return V2ModelMetadata(
            name=name, versions=["1"], platform="dapeng",
            inputs=[s.to_dict() for s in v2.input_specs(slot.capabilities)],
            outputs=[s.to_dict() for s in v2.output_specs(slot.capabilities, slot.labels)],
        )

    @router.get("/v2/models/{name}/ready", response_model=V2ModelReady, responses=v2_errors, tags=["v2"])
    async def model_ready(name: str) -> Any:
        """Whether the model takes requests."""
        slot = predicting(name)
        if state.draining or not state.started:
            return JSONResponse({"name": slot.name, "ready": False}, status_code=503)
        return V2ModelReady(name=slot.name, ready=True)

    @lean("/v2/models/{name}/infer", V2InferResponse, ["v2"], v2_errors, binary=v2.with_binary_data)
    async def infer(name: str, body: V2InferRequest) -> dict[str, Any]:
        """Predict for each row of the input tensor, batched with the V1 requests to the model."""
        slot = predicting(name)
        requested = [o.name for o in body.outputs] if body.outputs else None
        try:
            instances = v2.instances_from(body.inputs, slot.capabilities, state.config.max_items)
        except DapengError as err:
            raise _invalid(("inputs",), str(err)) from None
        predictions = await _submit(state, slot, slot.records(instances, state.config, param="inputs"), "inputs")
        try:
            outputs = v2.outputs_from(predictions, slot.capabilities, slot.labels, requested)
        except DapengError as err:
            raise _invalid(("outputs",), str(err)) from None
        return {"model_name": slot.name, "model_version": "1", "id": body.id, "outputs": outputs}


async def _in_worker(state: ServeState, slot: ModelSlot, fn: Callable[[], Any],
                     loc: tuple[str, ...] | Callable[[DapengError], tuple[str, ...]]) -> Any:
    """Run `fn` in the model's worker thread (outside the batcher), with the time limit.

    A DapengError it raises is a 422 naming `loc` (or the field `loc(error)` names).
    """
    if state.draining:
        raise _busy(state.config, "shutting down")
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(slot.executor, fn), state.config.timeout_s)
    except TimeoutError:
        raise _ApiError(504, f"no answer within {state.config.timeout_s:g} s") from None
    except DapengError as err:
        raise _invalid(loc(err) if callable(loc) else loc, str(err)) from None


def _options(body: Any, config: ServeConfig) -> dict[str, Any]:
    """A request's sampling options, in `CausalLM.decoding`'s names."""
    if getattr(body, "top_logprobs", None) is not None and not body.logprobs:
        raise _invalid(("top_logprobs",), "top_logprobs needs logprobs: true")
    if isinstance(body.logprobs, bool):  # chat: logprobs on/off, top_logprobs alternatives
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    return {
        "max_new_tokens": body.max_completion_tokens or body.max_tokens or config.max_new_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p if body.top_p < 1.0 else None,
        "top_k": body.top_k,
        "stop": [body.stop] if isinstance(body.stop, str) else list(body.stop or ()),
        "seed": body.seed,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "logprobs": logprobs,
    }


def _fallback_kwargs(options: dict[str, Any], pipeline: Any) -> dict[str, Any]:
    """The options a generator outside the scheduler accepts (`pipeline.generate`'s own names)."""
    import inspect

    kwargs = {k: v for k, v in options.items() if v is not None and k not in ("logprobs",)}
    task_generate = getattr(getattr(pipeline, "task", None), "generate", None) or pipeline.generate
    try:
        params = inspect.signature(task_generate).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _chat_prompt(pipeline: Any, messages: list[Any]) -> Any:
    """What to give `generate` for a chat: the messages themselves when the model has a chat
    template (the causal-lm task renders them), else a plain transcript to continue."""
    plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if getattr(getattr(pipeline, "task", None), "chat_template", None):
        return plain
    lines = [f"{m['role']}: {m['content']}" for m in plain]
    return "\n".join([*lines, "assistant:"])


class _Generation:
    """The choices of one OpenAI request: `n` per prompt, choice `p * n + i` for prompt p.

    Models the scheduler supports decode in its shared batch; any other generator (an
    object with `generate(prompt, stream=True)`) runs in the model's worker, one choice
    after another.
    """

    def __init__(self, state: ServeState, slot: ModelSlot, prompts: list[Any], n: int, options: dict[str, Any],
                 param: str) -> None:
        if state.draining:
            raise _busy(state.config, "shutting down")
        self.state, self.slot, self.n, self.options = state, slot, n, options
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.sequences: list[Sequence] = []
        self.prompt_tokens = 0
        self.pieces = [0] * (len(prompts) * n)
        self._cancelled = threading.Event()
        self._loop = asyncio.get_running_loop()
        if slot.scheduler is not None:
            self._submit(slot.scheduler, prompts, param)
        else:
            self.prompt_tokens = sum(len(str(p).split()) for p in prompts)
            self._loop.run_in_executor(slot.executor, self._produce, prompts)

    def _submit(self, scheduler: GenerationScheduler, prompts: list[Any], param: str) -> None:
        task, seed = self.slot.pipeline.task, self.options["seed"]
        device = getattr(self.slot.pipeline, "device", "cpu")
        try:
            decodings = [
                task.decoding(prompt, **{**self.options, "seed": None if seed is None else seed + i},
                              context=scheduler.context, device=device)
                for prompt in prompts for i in range(self.n)
            ]
        except DapengError as err:
            raise _invalid((param,), str(err)) from None
        self.prompt_tokens = sum(len(d.prompt_ids) for d in decodings[:: self.n])
        try:
            for index, decoding in enumerate(decodings):
                self.sequences.append(scheduler.submit(decoding, self.events, index))
        except (QueueFull, BatcherStopped) as err:
            self.cancel()
            raise _busy(self.state.config, str(err)) from None

    def _produce(self, prompts: list[Any]) -> None:
        """Runs in the worker: each choice through `pipeline.generate(stream=True)`."""
        loop_put = self._loop_put()
        kwargs = _fallback_kwargs(self.options, self.slot.pipeline)
        for index in range(len(prompts) * self.n):
            try:
                generation = self.slot.pipeline.generate(prompts[index // self.n], stream=True, **kwargs)
                for piece in generation:
                    if self._cancelled.is_set():
                        return
                    loop_put((index, Event(str(piece))))
                loop_put((index, Event(finish_reason=getattr(generation, "finish_reason", None) or "stop")))
            except Exception as err:
                loop_put((index, Event(error=err)))

    def _loop_put(self) -> Callable[[tuple[int, Event]], None]:
        return lambda item: self._loop.call_soon_threadsafe(self.events.put_nowait, item)

    @property
    def choices(self) -> int:
        return len(self.pieces)

    async def stream(self) -> AsyncIterator[tuple[int, Event]]:
        """Every choice's events as they come; a failed choice raises its error."""
        open_choices = self.choices
        try:
            while open_choices:
                index, event = await self.events.get()
                if event.error is not None:
                    raise event.error
                self.pieces[index] += 1 if event.piece else 0
                if event.finish_reason is not None:
                    open_choices -= 1
                yield index, event
        finally:
            self.cancel()

    def cancel(self) -> None:
        self._cancelled.set()
        for sequence in self.sequences:
            sequence.cancel()

    def usage(self) -> dict[str, int]:
        completion = sum(s.completion_tokens for s in self.sequences) if self.sequences else sum(self.pieces)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    async def collect(self) -> list[dict[str, Any]]:
        """Each choice's text, finish reason and log-probabilities, within the time limit."""
        texts: list[list[str]] = [[] for _ in range(self.choices)]
        logprobs: list[list[Any]] = [[] for _ in range(self.choices)]
        finish: list[str | None] = [None] * self.choices

        async def gather() -> None:
            async for index, event in self.stream():
                texts[index].append(event.piece)
                logprobs[index].extend(event.logprobs)
                finish[index] = event.finish_reason or finish[index]

        try:
            await asyncio.wait_for(gather(), self.state.config.timeout_s)
        except TimeoutError:
            raise _ApiError(504, f"no answer within {self.state.config.timeout_s:g} s") from None
        except DapengError as err:
            raise _invalid(("prompt",), str(err)) from None
        return [{"text": "".join(t), "finish_reason": f, "logprobs": lp}
                for t, f, lp in zip(texts, finish, logprobs)]


def _completion_logprobs(entries: list[Any]) -> dict[str, Any]:
    """Log-probabilities in the legacy completions shape."""
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def _chat_logprobs(entries: list[Any]) -> dict[str, Any]:
    """Log-probabilities in the chat completions shape."""
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def _add_openai_routes(router: APIRouter, state: ServeState, bodies: Any) -> None:
    CompletionRequest, ChatRequest = bodies.completion, bodies.chat  # noqa: N806 (pydantic classes)
    EmbeddingRequest = bodies.embedding  # noqa: N806
    sse = {
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"}
    }
    errors = {code: {"model": OpenAIErrorBody, "description": text} for code, text in
              ((404, "unknown model"), (422, "invalid request"), (503, "queue full or shutting down"),
               (504, "past the time limit"))}

    def generator(name: str) -> ModelSlot:
        slot = state.slot(name)
        slot.require("generate", "model")
        return slot

    @router.post("/v1/completions", response_model=Completion, responses={**sse, **errors}, tags=["openai"])
    async def completions(body: CompletionRequest) -> Any:  # type: ignore[valid-type]
        """OpenAI-compatible text completion (`"stream": true` for server-sent events)."""
        slot = generator(body.model)  # type: ignore[attr-defined]
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)  # type: ignore[attr-defined]
        run = _Generation(state, slot, prompts, body.n, _options(body, state.config), "prompt")  # type: ignore[attr-defined]
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": slot.name}
        with_logprobs = body.logprobs is not None  # type: ignore[attr-defined]
        if body.stream:  # type: ignore[attr-defined]

            def chunks(index: int, event: Event) -> list[dict[str, Any]]:
                logprobs = _completion_logprobs(event.logprobs) if with_logprobs else None
                choice = {"index": index, "text": event.piece, "finish_reason": event.finish_reason,
                          "logprobs": logprobs}
                return [{**head, "choices": [choice]}]

            return _sse(run, head, chunks, body.stream_options)  # type: ignore[attr-defined]
        choices = await run.collect()
        for i, choice in enumerate(choices):
            choice["index"] = i
            choice["logprobs"] = _completion_logprobs(choice["logprobs"]) if with_logprobs else None
        return Completion(**head, choices=choices, usage=run.usage())

    @router.post("/v1/chat/completions", response_model=ChatCompletion, responses={**sse, **errors},
                 tags=["openai"])
    async def chat_completions(body: ChatRequest) -> Any:  # type: ignore[valid-type]
        """OpenAI-compatible chat completion (`"stream": true` for server-sent events)."""
        slot = generator(body.model)  # type: ignore[attr-defined]
        prompt = _chat_prompt(slot.pipeline, body.messages)  # type: ignore[attr-defined]
        run = _Generation(state, slot, [prompt], body.n, _options(body, state.config), "messages")  # type: ignore[attr-defined]
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": slot.name}
        with_logprobs = bool(body.logprobs)  # type: ignore[attr-defined]
        if body.stream:  # type: ignore[attr-defined]
            started: set[int] = set()

            def chunks(index: int, event: Event) -> list[dict[str, Any]]:
                out = []
                if event.piece or index not in started:
                    delta: dict[str, Any] = {"content": event.piece}
                    if index not in started:
                        delta["role"] = "assistant"
                        started.add(index)
                    logprobs = _chat_logprobs(event.logprobs) if with_logprobs else None
                    out.append({**head, "choices": [{"index": index, "delta": delta, "finish_reason": None,
                                                     "logprobs": logprobs}]})
                if event.finish_reason is not None:
                    out.append({**head, "choices": [{"index": index, "delta": {},
                                                     "finish_reason": event.finish_reason}]})
                return out

            return _sse(run, head, chunks, body.stream_options)  # type: ignore[attr-defined]
        choices = [
            {"index": i, "message": {"content": c["text"]}, "finish_reason": c["finish_reason"],
             "logprobs": _chat_logprobs(c["logprobs"]) if with_logprobs else None}
            for i, c in enumerate(await run.collect())
        ]
        return ChatCompletion(**{**head, "object": "chat.completion"}, choices=choices, usage=run.usage())

    @router.post("/v1/embeddings", response_model=EmbeddingList, responses=errors, tags=["openai"])
    async def embeddings(body: EmbeddingRequest) -> EmbeddingList:  # type: ignore[valid-type]
        """OpenAI-compatible embeddings of one text or a list of them."""
        import base64

        import numpy as np

        slot = state.slot(body.model)  # type: ignore[attr-defined]
        slot.require("embed", "model")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)  # type: ignore[attr-defined]
        if any(not t for t in texts):
            raise _invalid(("input",), "every input must be a non-empty string")

        def run() -> tuple[Any, int]:
            vectors = np.asarray(slot.pipeline.embed(texts), dtype=np.float32)
            tokenizer = getattr(slot.pipeline.task, "tokenizer", None)
            tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts)) if tokenizer is not None else 0
            return vectors, tokens

        vectors, tokens = await _in_worker(state, slot, run, ("input",))
        if body.dimensions is not None and body.dimensions != vectors.shape[1]:  # type: ignore[attr-defined]
            raise _invalid(("dimensions",), f"model {slot.name!r} makes {vectors.shape[1]}-dimensional embeddings")
        if body.encoding_format == "base64":  # type: ignore[attr-defined]
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            data = [v.tolist() for v in vectors]
        return EmbeddingList(data=[{"index": i, "embedding": d} for i, d in enumerate(data)], model=slot.name,
                             usage={"prompt_tokens": tokens, "total_tokens": tokens})


def _sse(
    run: _Generation,
    head: dict[str, Any],
    chunks: Callable[[int, Event], list[dict[str, Any]]],
    options: Any,
) -> StreamingResponse:
    """Stream a generation's events as server-sent events, ending with [DONE].

    With `stream_options.include_usage` every chunk carries `"usage": null` and one last
    chunk without choices carries the usage of the whole request (OpenAI's protocol). When
    the client goes away, the sequences leave the batch at the next step.
    """
    include_usage = bool(options and options.include_usage)

    def data(chunk: dict[str, Any]) -> str:
        return f"data: {json.dumps({**chunk, 'usage': None} if include_usage else chunk)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            async for index, event in run.stream():
                for chunk in chunks(index, event):
                    yield data(chunk)
        except Exception as err:
            log.error("generation failed for model %s: %s", run.slot.name, err)
            error = _openai_error(422 if isinstance(err, DapengError) else 500, str(err), None)
            yield f"data: {json.dumps(error)}\n\n"
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': run.usage()})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _add_ops_routes(app: FastAPI, state: ServeState) -> None:
    @app.get("/health", response_model=Status, tags=["ops"])
    async def health() -> Status:
        """Liveness: the process answers."""
        return Status(status="ok")

    @app.get(
        "/ready",
        response_model=Status,
        responses={503: {"model": Status, "description": "not ready"}},
        tags=["ops"],
    )
    async def ready() -> Any:
        """Readiness: models loaded and not shutting down (a load balancer's health check)."""
        if state.draining or not state.started:
            return JSONResponse({"status": "draining" if state.draining else "starting"}, status_code=503)
        return Status(status="ready")

    @app.get("/metrics", response_class=PlainTextResponse, tags=["ops"])
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics: requests, latencies, batch sizes, queue depth."""
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
