"""Prometheus metrics of one server: requests, latencies, batch sizes, queue depth, generated tokens.

Each app owns its `CollectorRegistry`, so several servers (or tests) in one process never
collide. With `--workers N` each process reports its own numbers; scrape each replica
(or add `worker` labels at the load balancer) rather than expecting one merged view.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dapeng_requests", "HTTP requests answered", ["endpoint", "model", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "dapeng_request_latency_seconds",
            "time from request to response",
            ["endpoint", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "dapeng_batch_size",
            "items per forward pass",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            "dapeng_batch_latency_seconds",
            "time of one forward pass",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "dapeng_queue_depth", "items waiting for a batch", ["model"], registry=self.registry
        )
        self.in_flight = Gauge(
            "dapeng_in_flight",
            "items accepted and not yet answered (queued + computing)",
            ["model"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "dapeng_generated_tokens", "tokens generated", ["model"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "dapeng_time_to_first_token_seconds",
            "time from a generation request to its first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_token = Histogram(
            "dapeng_time_per_output_token_seconds",
            "time between two tokens of one sequence",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decode_batch_size = Histogram(
            "dapeng_decode_batch_size",
            "sequences sharing one decoding step",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.decode_step_latency = Histogram(
            "dapeng_decode_step_seconds",
            "time of one decoding step (with the prefill of the sequences joining)",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def track_queue(self, model: str, depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        """Report the model's queue depth and in-flight items, read at every scrape."""
        self.queue_depth.labels(model=model).set_function(depth)
        self.in_flight.labels(model=model).set_function(in_flight)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model=model).observe(size)
        self.batch_latency.labels(model=model).observe(seconds)

    def observe_decode_step(self, model: str, size: int, seconds: float) -> None:
        self.decode_batch_size.labels(model=model).observe(size)
        self.decode_step_latency.labels(model=model).observe(seconds)

    def observe_token(self, model: str, seconds: float, first: bool) -> None:
        self.generated_tokens.labels(model=model).inc()
        (self.time_to_first_token if first else self.time_per_token).labels(model=model).observe(seconds)

    def observe_request(self, endpoint: str, model: str, code: int, seconds: float) -> None:
        # One per request: the labelled children are looked up once per label set, not each time
        # (`labels()` takes a lock and builds a key; label sets are few and bounded).
        key = (endpoint, model, code)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(endpoint=endpoint, model=model, code=str(code)),
                self.latency.labels(endpoint=endpoint, model=model),
            )
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
