"""Typed run configs (DESIGN.md "Config"): a YAML file plus `--set a.b=c` overrides.

Unknown keys and wrong types are errors naming the key and the allowed values.
Modules never take these objects: builders map config → plain constructor arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where the records come from: a catalog data set or the user's own files."""

    dataset: str | None = None
    train: Path | None = None
    eval: Path | None = None
    test: Path | None = None
    format: Literal["csv", "jsonl", "imagefolder", "idx", "conll", "squad", "text"] | None = None
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    limit: int | None = Field(None, gt=0, description="use only the first N training records (smoke runs)")
    seed: int = 0


class ModelConfig(_Strict):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    init: str | None = None


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(_Strict):
    name: Literal["constant", "step", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    step_size: int = Field(1000, gt=0)
    gamma: float = Field(0.1, gt=0.0)


class TrainConfig(_Strict):
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int | None = None
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    l1: float = Field(0.0, ge=0.0)
    grad_accum: int = Field(1, gt=0)
    grad_clip: float | None = Field(None, gt=0.0)
    compile: bool = False
    early_stopping: int | None = Field(None, gt=0, description="stop after N evals without improvement")
    monitor: str = "eval/loss"
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: int | None = Field(None, gt=0, description="steps between checkpoints (default: each epoch)")


class RunConfig(_Strict):
    task: str
    task_options: dict[str, Any] = Field(default_factory=dict)
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
