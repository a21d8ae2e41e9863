"""Typed run configs (DESIGN.md "Config"): a YAML file plus `--set a.b=c` overrides.

Unknown keys and wrong types are errors naming the key and the allowed values.
Modules never take these objects: builders map config → plain constructor arguments.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dapeng.errors import ConfigError


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
    token_column: int = Field(0, description="CoNLL files: 0-based column of the tokens (negative: from the end)")
    tag_column: int = Field(-1, description="CoNLL files: 0-based column of the tags; -1 is the last column")
    source_column: str | None = Field(
        None, description="CSV/TSV/JSONL pairs (translation, summarization): the column of the input text"
    )
    target_column: str = Field("target", description="CSV/TSV/JSONL pairs: the column of the output text")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    limit: int | None = Field(None, gt=0, description="use at most N records of each split, a seeded sample stratified by label (smoke runs)")
    labels_per_class: int | None = Field(
        None, gt=0, description="keep the labels of only N training records per class (seeded); the rest of "
        "train becomes the unlabeled pool, labels dropped (`semi:` learns from it)",
    )
    labelled_fraction: float | None = Field(
        None, gt=0.0, lt=1.0, description="keep the labels of this fraction of train, stratified and seeded; "
        "the rest becomes the unlabeled pool",
    )
    unlabeled: bool = Field(False, description="drop the labels: the text (or images) only, for self-supervised "
                            "pretraining (masked-lm, causal-lm, contrastive) on a labelled data set's own splits")
    seed: int = 0


class LoraConfig(_Strict):
    """LoRA adapters over the model's linear layers (`dapeng.layers.lora.apply_lora`)."""

    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, gt=0.0, description="update scale numerator; default 2 x rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["all-linear"],
                               description='linear layer names or dotted suffixes ("q", "attn.o"), or "all-linear"')
    keep_trainable: list[str] = Field(default_factory=lambda: ["head"], description="modules trained in full")


class UnfreezeConfig(_Strict):
    """Gradual unfreezing (ULMFiT): the top `start` layer groups train first, `per_epoch` more each epoch."""

    start: int = Field(1, ge=1)
    per_epoch: int = Field(1, ge=1)


class ModelConfig(_Strict):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    init: str | None = None
    freeze: int = Field(0, ge=0, description="freeze the lowest N layer groups (1: embeddings, 2: and block 0, ...)")
    gradual_unfreezing: UnfreezeConfig | None = None
    lora: LoraConfig | None = None


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    layerwise_decay: float | None = Field(
        None, gt=0.0, le=1.0, description="layer-wise LR decay: each layer group below the top gets lr x decay^depth"
    )


class ScheduleConfig(_Strict):
    name: Literal["constant", "step", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    step_size: int = Field(1000, gt=0)
    gamma: float = Field(0.1, gt=0.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine/linear decay floor, as a fraction of lr")


class TrainConfig(_Strict):
    epochs: int = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int | None = None
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    l1: float = Field(0.0, ge=0.0)
    grad_accum: int = Field(1, gt=0)
    grad_clip: float | None = Field(None, gt=0.0)
    ema: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="decay of a moving average of the weights (e.g. 0.999) that is evaluated and saved",
    )
    compile: bool = False
    early_stopping: int | None = Field(None, gt=0, description="stop after N evals without improvement")
    monitor: str = "eval/loss"
    mode: Literal["auto", "min", "max"] = "auto"
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: int | None = Field(None, gt=0, description="steps between checkpoints (default: each epoch)")
    eval_every: int | None = Field(None, gt=0, description="steps between evaluations (default: each epoch)")
    log_every: int = Field(50, gt=0, description="steps between logged losses (each log costs one device sync)")
    strategy: Literal["auto", "none", "ddp", "fsdp", "tp"] = Field(
        "auto", description="on many processes (torchrun): ddp, fsdp (sharded) or tp (tensor parallel); "
        "auto: ddp on more than one process",
    )
    dist_timeout: float = Field(300.0, gt=0.0, description="seconds a rank waits for the others before failing")


class TransferConfig(_Strict):
    """Perturbed copies of texts (`dapeng.data.augment.perturbed_copies`): the transfer set a teacher
    labels (`distill.transfer`), or the strong views of unlabeled texts (`semi.text`)."""

    copies: int = Field(0, ge=0, description="perturbed copies of each training text (0: none)")
    drop: float = Field(0.1, ge=0.0, lt=1.0, description="probability of dropping each word")
    synonym: float = Field(0.1, ge=0.0, lt=1.0, description="probability of a GloVe-neighbour replacement")
    ngram: float = Field(0.0, ge=0.0, le=1.0, description="probability of cutting a copy to 1-5 consecutive words")
    seed: int = 0


class DistillConfig(_Strict):
    """Knowledge distillation from a trained classifier (`dapeng.compress.distill`)."""

    teacher: str = Field(description="the teacher: a run directory, an Artifact folder or a hub name")
    alpha: float = Field(0.5, gt=0.0, le=1.0, description="weight of the soft-target loss (1 - alpha on the labels)")
    temperature: float = Field(2.0, gt=0.0)
    loss: Literal["kl", "mse"] = "kl"
    batch_size: int = Field(64, gt=0, description="batch size of the teacher's one pass over the data")
    transfer: TransferConfig = Field(default_factory=TransferConfig)


class SemiImageConfig(_Strict):
    """Views of an unlabeled image (`dapeng.data.augment`): weak = flip + crop; strong = weak, then
    RandAugment (`ops` random operations at random magnitudes) and Cutout."""

    hflip: bool = True
    crop_padding: int = Field(2, ge=0, description="pixels of padding of the weak view's random crop")
    ops: int = Field(2, ge=0, description="RandAugment operations per strong view")
    cutout: float = Field(0.5, ge=0.0, lt=1.0, description="side of the strong view's Cutout square, as a fraction")


def _strong_text() -> TransferConfig:
    return TransferConfig(copies=4, drop=0.2, synonym=0.2)


class SemiConfig(_Strict):
    """Semi-supervised learning from the unlabeled pool (`data.labels_per_class` or `data.labelled_fraction`;
    `dapeng.tasks.semi`): each training batch of B labelled items draws `ratio` x B unlabeled ones."""

    method: Literal["fixmatch", "pseudo_label"] = Field(
        "fixmatch", description="fixmatch: the weak view's confident prediction is the strong view's target; "
        "pseudo_label: an unlabeled item's own confident prediction is its target",
    )
    threshold: float = Field(0.95, gt=0.0, le=1.0, description="confidence a prediction needs to become a target")
    weight: float = Field(1.0, gt=0.0, description="weight of the unlabeled loss (lambda_u) next to the labelled loss")
    ratio: int = Field(7, ge=1, description="unlabeled items per labelled item in a batch (mu)")
    image: SemiImageConfig = Field(default_factory=SemiImageConfig)
    text: TransferConfig = Field(default_factory=_strong_text,
                                 description="strong views of unlabeled texts (the weak view is the text itself)")


class RunConfig(_Strict):
    task: str
    task_options: dict[str, Any] = Field(default_factory=dict)
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig | None = None
    semi: SemiConfig | None = None


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `a.b=c` overrides and validate it.

    Relative data paths in the file are resolved against the file's folder when they
    exist there (so an example config works from any working directory), else the
    working directory. Overrides are parsed as YAML scalars (`3`, `true`, `1e-3`, `[1, 2]`).

    Raises:
        ConfigError: a missing/unreadable file, bad YAML, an unknown key, a wrong type or
            a missing data file; the message names the key and the allowed values.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found", "pass the path of a YAML run config")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {str(path)!r}{where}: invalid YAML", "check the indentation and quoting") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys", "see examples/*.yaml")
        raw = loaded
        base = path.resolve().parent
        _resolve_data_paths(raw, base)
    for item in overrides or []:
        apply_override(raw, item)
    cfg = validate_config(raw)
    check_data_files(cfg)
    return cfg


def validate_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a plain dict as a RunConfig, turning pydantic's report into one ConfigError line."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        errors = err.errors()
        message = describe_error(errors[0])
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise ConfigError(message + more) from None


def parse_value(text: str) -> Any:
    """Type a `--set` value: YAML scalars and lists, plus the float forms YAML 1.1 misses (`1e-3`)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override to a raw config dict in place."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form key.path=value", "e.g. --set train.epochs=5")
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            done = ".".join(parts[: depth + 1])
            raise ConfigError(f"config key {done}: is a value, not a section", f"cannot set {key}")
        node = child
    value = parse_value(text)
    if parts[0] == "data" and len(parts) == 2 and parts[1] in _PATH_KEYS and isinstance(value, str):
        value = str(Path(value).expanduser().resolve())
    node[parts[-1]] = value


def dump_config(cfg: RunConfig) -> str:
    """The fully resolved config as YAML (every default spelled out), for RUN/config.yaml."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def check_data_files(cfg: RunConfig) -> None:
    """Missing user data files are config errors that name the key."""
    for key in _PATH_KEYS:
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"config key data.{key}: file {str(value)!r} not found", "check the path")


# --------------------------------------------------------------------------- helpers

_PATH_KEYS = ("train", "eval", "test")


def _resolve_data_paths(raw: dict[str, Any], base: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in _PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            if not path.is_absolute() and (base / path).exists():
                path = base / path
            data[key] = str(path.resolve())


def describe_error(error: dict[str, Any]) -> str:
    """One line for one pydantic error: `config key a.b: <what is wrong>`."""
    loc = [str(part) for part in error.get("loc", ())]
    key = ".".join(loc) or "(top level)"
    kind = error.get("type", "")
    value = error.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"config key {key}: unknown key — {hint}allowed keys: {', '.join(allowed)}"
    if kind == "missing":
        return f"config key {key}: missing (required)"
    if kind == "literal_error":
        choices = _literal_choices(loc)
        return f"config key {key}: {value!r} is not one of {', '.join(choices)}"
    msg = str(error.get("msg", "invalid value"))
    msg = msg[0].lower() + msg[1:] if msg else msg
    return f"config key {key}: {value!r} — {msg}"


def _field_annotation(loc: list[str]) -> Any:
    """The annotation of the field at `loc` in RunConfig, or None when `loc` leaves the models."""
    model: Any = RunConfig
    annotation: Any = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = _unwrap_model(annotation)
    return annotation


def _unwrap_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _allowed_keys(loc: list[str]) -> list[str]:
    model = RunConfig if not loc else _unwrap_model(_field_annotation(loc))
    return list(model.model_fields) if model is not None else []


def _literal_choices(loc: list[str]) -> list[str]:
    annotation = _field_annotation(loc)
    stack, choices = [annotation], []
    while stack:
        current = stack.pop()
        if typing.get_origin(current) is Literal:
            choices.extend(str(arg) for arg in typing.get_args(current))
        else:
            stack.extend(typing.get_args(current))
    return choices
