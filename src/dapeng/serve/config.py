"""The server's settings: batching, limits and access, one frozen object."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["API_KEY_ENV", "ServeConfig", "default_torch_threads"]

API_KEY_ENV = "DAPENG_API_KEY"


def default_torch_threads() -> int:
    """Half the cores, at least one: the other half serves HTTP (and, on one machine, the clients).

    Measured on 2 cores: with two torch threads and one core busy elsewhere, throughput
    collapsed 2–200×, so the server never hands torch every core by default.
    """
    return max(1, (os.cpu_count() or 2) // 2)


class ServeConfig(BaseModel):
    """How the server batches, what it accepts, and who may call it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(32, ge=1, description="most items in one forward pass; 1 turns batching off")
    max_wait_ms: float = Field(5.0, ge=0.0, description="longest extra wait for a batch to refill")
    max_queue: int = Field(1024, ge=1, description="most items waiting per model; beyond it 503")
    max_body_bytes: int = Field(2_000_000, ge=1024, description="largest request body; beyond it 413")
    max_items: int = Field(64, ge=1, description="most instances in one request")
    max_input_chars: int = Field(20_000, ge=1, description="longest text input")
    max_new_tokens: int = Field(512, ge=1, description="most tokens one completion may generate")
    timeout_s: float = Field(30.0, gt=0.0, description="per-request time limit; beyond it 504")
    retry_after_s: int = Field(1, ge=1, description="the Retry-After a 503 advertises")
    api_key: str | None = Field(None, description="when set, every model endpoint needs it")
    torch_threads: int = Field(default_factory=default_torch_threads, ge=1)
