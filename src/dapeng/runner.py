"""Config → run directory: the one function behind `dapeng train` (and `dapeng eval`).

```
RUN/config.yaml      the fully resolved config (every default spelled out)
RUN/model/           Artifact of the best checkpoint (dapeng.load(RUN) reads it)
RUN/checkpoints/     last.pt (full trainer state, for --resume) and best.pt
RUN/metrics.jsonl    one object per log event
RUN/metrics.json     {"train": {...}, "eval": {...}, "test": {...}}
RUN/tb/              TensorBoard events
RUN/curves.png       training curves
RUN/{eval,test}_*    the task's detailed reports, where its metric writes them (confusion matrix, per class)
```

Under torchrun (`train.strategy`, `dapeng.train.distributed`) every rank runs every
stage, and only rank 0 writes the run directory; with FSDP/TP the checkpoint is the
sharded folder `RUN/checkpoints/last/` and `RUN/model/` the gathered plain Artifact.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dapeng.config import RunConfig, TrainConfig, dump_config, load_config
from dapeng.errors import CheckpointError, ConfigError

__all__ = [
    "attach_wrappers", "build_model", "build_task", "build_task_and_model", "check_names", "encode_splits",
    "evaluate", "evaluate_splits", "finetune_kwargs", "load_run_config", "load_splits", "open_run_dir",
    "run_trackers", "save_run_artifact", "split_facts", "train", "trainer_kwargs",
]

CONFIG = "config.yaml"
METRICS = "metrics.json"
METRICS_LOG = "metrics.jsonl"


def trainer_kwargs(train: TrainConfig) -> dict[str, Any]:
    """Map the `train:` section to the Trainer's plain keyword arguments."""
    opt, sched = train.optimizer, train.schedule
    return {
        "epochs": train.epochs, "max_steps": train.max_steps, "batch_size": train.batch_size,
        "eval_batch_size": train.eval_batch_size,
        "optimizer": opt.name, "lr": opt.lr, "weight_decay": opt.weight_decay, "momentum": opt.momentum,
        "nesterov": opt.nesterov, "betas": opt.betas, "eps": opt.eps,
        "schedule": sched.name, "warmup_steps": sched.warmup_steps, "step_size": sched.step_size,
        "gamma": sched.gamma, "min_lr_ratio": sched.min_lr_ratio,
        "l1": train.l1, "grad_accum": train.grad_accum, "grad_clip": train.grad_clip,
        "ema": train.ema,
        "precision": train.precision, "device": train.device, "compile": train.compile,
        "early_stopping": train.early_stopping, "monitor": train.monitor, "mode": train.mode,
        "seed": train.seed, "deterministic": train.deterministic,
        "checkpoint_every": train.checkpoint_every, "eval_every": train.eval_every, "log_every": train.log_every,
        "strategy": train.strategy, "dist_timeout": train.dist_timeout,
    }


def load_splits(cfg: RunConfig) -> Any:
    """The run's records, from the data package (imported late: it pulls in readers)."""
    from dapeng.data import load_splits as load

    return load(cfg.data)


def check_names(cfg: RunConfig) -> None:
    """Unknown task or model names fail before any data is loaded, naming the allowed values."""
    import difflib

    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    for key, name, registry in (("task", cfg.task, TASKS), ("model.name", cfg.model.name, MODELS)):
        if name not in registry:
            close = difflib.get_close_matches(name, registry.names(), n=1)
            raise ConfigError(f"config key {key}: {name!r} is not one of {', '.join(registry.names())}",
                              f"did you mean {close[0]}?" if close else None)


def build_task_and_model(cfg: RunConfig, train_records: Sequence[Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Stage 3 from a config: `build_task` then `build_model`."""
    task = build_task(cfg.task, cfg.task_options, train_records, init=cfg.model.init)
    model, kwargs = build_model(task, cfg.model.name, cfg.model.kwargs, init=cfg.model.init)
    return task, model, kwargs


def build_task(name: str, options: dict[str, Any], train_records: Sequence[Any], init: str | None = None) -> Any:
    """The task `name` with `options`, set up on the training records (label set, tokenizer, ...).

    With `init` (a hub name or an Artifact), the pretrained model's task options come first
    (`dapeng.hub.init.pretrained_task_options`): a causal LM must not learn a throw-away
    tokenizer nor lose its chat template.
    """
    from dapeng.tasks import TASKS

    options = dict(options)
    if init:
        from dapeng.hub.init import pretrained_task_options

        options = {**pretrained_task_options(init, name), **options}
    try:
        task = TASKS.create(name, **options)
    except TypeError as err:
        raise ConfigError(f"config key task_options: {err}", f"see the options of task {name!r}") from None
    from dapeng.hub.artifact import attach_encoder

    attach_encoder(task)  # a task that reads another model's embeddings (a contextual topic model)
    task.setup(train_records)
    return task


def build_model(task: Any, name: str, kwargs: dict[str, Any], init: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The model `name` sized for `task` (its `model_kwargs`, then `kwargs`), and the kwargs that rebuild it.

    With `init`, the pretrained weights (`dapeng.hub.init.load_init`): only keys that own no
    weights may be overridden.
    """
    from dapeng.models import create_model

    if init:
        from dapeng.hub.init import load_init

        return load_init(init, name, dict(kwargs), task)
    full = {**task.model_kwargs(), **kwargs}
    model = create_model(name, full, given=kwargs, key="config key model.kwargs.")
    if hasattr(task, "init_model"):  # data-dependent initialisation, e.g. GloVe word vectors
        task.init_model(model)
    return model, full


def finetune_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Map the fine-tuning keys of a config (`model.lora`, `model.freeze`, `model.gradual_unfreezing`,
    `train.optimizer.layerwise_decay`) to `dapeng.train.finetune.apply_finetune`'s arguments."""
    m, opt = cfg.model, cfg.train.optimizer
    unfreeze = m.gradual_unfreezing
    return {
        "lora": m.lora.model_dump() if m.lora else None, "freeze_groups": m.freeze or 0,
        "gradual_unfreezing": (unfreeze.start, unfreeze.per_epoch) if unfreeze else None,
        "layerwise_decay": opt.layerwise_decay, "lr": opt.lr, "weight_decay": opt.weight_decay,
    }


def encode_splits(task: Any, splits: Any) -> dict[str, list[Any]]:
    """Stage: every split's records through `task.encode`, once (the items are cached tensors)."""
    return {name: task.encode(records) if records else [] for name, records in
            ((name, getattr(splits, name)) for name in ("train", "eval", "test"))}


def attach_wrappers(cfg: RunConfig, task: Any, splits: Any, items: dict[str, list[Any]]) -> tuple[Any, dict[str, Any]]:
    """Stage: wrap the task for what rides along with its items — a teacher's logits (`distill:`),
    the unlabeled pool (`semi:`, `dapeng.tasks.semi`).

    Returns the task to train (the wrapper, or `task`) and facts for the run's metrics;
    `items["train"]` may grow (the teacher's transfer set).
    """
    facts: dict[str, Any] = {}
    if cfg.distill:
        from dapeng.compress.distill import attach_teacher
        from dapeng.train.precision import resolve_device

        task, items["train"], facts = attach_teacher(cfg.distill, task, splits.train, items["train"],
                                                     splits.eval or (), str(resolve_device(cfg.train.device)),
                                                     items["eval"])
    if cfg.semi:
        from dapeng.tasks.semi import attach_semi
        from dapeng.train import distributed

        task, semi_facts = attach_semi(cfg.semi, task, items["train"], splits.unlabeled, distributed.world().size)
        facts.update(semi_facts)
    return task, facts


def split_facts(cfg: RunConfig, splits: Any) -> dict[str, Any]:
    """For the run's metrics, a few-label split's make and sizes: labelled `train_records`, `unlabeled_records`."""
    d = cfg.data
    if not (d.labels_per_class or d.labelled_fraction):
        return {}
    return {"labels_per_class": d.labels_per_class, "labelled_fraction": d.labelled_fraction,
            "train_records": len(splits.train), "unlabeled_records": len(splits.unlabeled)}


def open_run_dir(out: Path, config: RunConfig, resume: bool) -> None:
    """Stage: create the run directory and write its resolved config.

    Runs only once data, task and model are built: a failed start leaves a fresh `out` absent
    and a used one as it was.
    """
    from dapeng._files import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh start in a folder whose earlier run died before its first checkpoint
        shutil.rmtree(out / "tb", ignore_errors=True)
    atomic_write(out / CONFIG, lambda f: f.write(dump_config(config).encode()))


def run_trackers(out: Path, title: str, progress: bool) -> list[Any]:
    """The Trainer callbacks every run records with: metrics.jsonl, TensorBoard, and progress on stderr."""
    from dapeng.track import JsonlLogger, TensorBoardLogger, progress_tracker

    trackers: list[Any] = [JsonlLogger(out / METRICS_LOG), TensorBoardLogger(out / "tb")]
    shown = progress_tracker(title) if progress else None
    return [*trackers, shown] if shown is not None else trackers


def evaluate_splits(trainer: Any, items: dict[str, list[Any]], report_dir: Path | None) -> dict[str, dict[str, Any]]:
    """Stage: the best model's metrics on the eval and test items (empty for a missing split)."""
    return {split: _strip(trainer.evaluate(items[split], prefix=split, report_dir=report_dir)) if items[split] else {}
            for split in ("eval", "test")}


def save_run_artifact(out: Path, config: RunConfig, model: Any, precision: str, task: Any,
                      model_kwargs: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Stage: metrics.json, the Artifact of the trained model (`Trainer.export_model`; LoRA merged:
    it serves, exports and quantizes as the plain architecture), and the training curves."""
    from dapeng._files import atomic_write
    from dapeng.hub.artifact import save_artifact
    from dapeng.track import plot_curves, read_log

    if config.model.lora:
        from dapeng.layers.lora import merge_lora

        merge_lora(model)
    atomic_write(out / METRICS, lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()))
    model_dir = save_artifact(
        out / "model", model=model.to("cpu"), model_name=config.model.name, model_kwargs=model_kwargs,
        task_name=config.task, task_state=task.state(), metrics={"eval": metrics["eval"], "test": metrics["test"]},
        card=_card_facts(config, metrics["train"]["trainable_fraction"], metrics["train"]), parent=config.model.init,
        precision=precision,
    )
    plot_curves(read_log(out / METRICS_LOG), out / "curves.png", title=f"{config.model.name} on {_data_name(config)}")
    return model_dir


def train(
    config: RunConfig,
    out: str | Path,
    resume: bool = False,
    *,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Train the model a config describes and write the run directory (module docstring).

    The stages, in order, each usable on its own from a custom loop: check the run directory →
    `load_splits` → `build_task` (rank 0's, on many processes) / `build_model` → `apply_finetune` → `encode_splits` →
    `attach_wrappers` → `open_run_dir` → `Trainer.fit` → `evaluate_splits` → `save_run_artifact`.

    Args:
        config: the validated run config.
        out: the run directory.
        resume: continue the killed or finished run in `out` from its last checkpoint.
        callbacks: extra Trainer callbacks.
        progress: show progress on stderr: a bar on a terminal, a line per epoch/evaluation elsewhere
            (`dapeng.track.progress_tracker`); none under DAPENG_QUIET=1.

    Returns:
        `{"run": ..., "model": ..., "metrics": {"train", "eval", "test"}, "steps": ...}`.

    Raises:
        ConfigError: `out` already holds a run (without `resume`), or the config differs
            from the run's own on `resume`.
    """
    from dapeng.train import distributed
    from dapeng.train.finetune import apply_finetune
    from dapeng.train.precision import seed_everything
    from dapeng.train.trainer import Trainer, checkpoint_exists

    out = Path(out)
    here = distributed.init(config.train.strategy, config.train.device, config.train.dist_timeout)
    _check_run_dir(config, out, checkpoint_exists(out / "checkpoints"), resume)
    check_names(config)
    seed_everything(config.train.seed)
    splits = load_splits(config)
    # every rank trains rank 0's task: label sets and tokenizers set up on each could differ in order
    task = distributed.from_rank0(build_task(config.task, config.task_options, splits.train, init=config.model.init))
    model, model_kwargs = build_model(task, config.model.name, config.model.kwargs, init=config.model.init)
    finetune_callbacks, param_groups = apply_finetune(model, **finetune_kwargs(config))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    items = encode_splits(task, splits)
    task, wrapper_facts = attach_wrappers(config, task, splits, items)
    if here.is_main:
        open_run_dir(out, config, resume)
    distributed.barrier()

    trackers = run_trackers(out, f"train {config.model.name}", progress) if here.is_main else []
    trainer = Trainer(model, task, checkpoint_dir=out / "checkpoints", param_groups=param_groups,
                      callbacks=[*finetune_callbacks, *trackers, *callbacks], **trainer_kwargs(config.train))
    summary = trainer.fit(items["train"], items["eval"] or None, resume=resume)
    trainer.load_best()
    if hasattr(task, "fit_facts"):  # what a wrapper saw during training (semi: how many unlabeled items counted)
        wrapper_facts.update(task.fit_facts())

    metrics = {"train": {k: v for k, v in summary.items() if v is not None}, **evaluate_splits(trainer, items, out)}
    metrics["train"].update(precision=trainer.precision, device=str(trainer.device), trainable_params=trainable,
                            trainable_fraction=trainable / max(total, 1),
                            **{k: v for k, v in {**split_facts(config, splits), **wrapper_facts}.items()
                               if v is not None})
    trained = trainer.export_model()  # gathers FSDP/TP shards: every rank takes part
    model_dir = out / "model"
    if here.is_main:
        save_run_artifact(out, config, trained, trainer.precision, task, model_kwargs, metrics)
    distributed.barrier()  # the run directory is complete before any rank reports it
    return {"run": str(out), "model": str(model_dir), "metrics": metrics, "steps": summary["steps"],
            "stopped": summary["stopped"]}


def load_run_config(run: str | Path) -> RunConfig:
    """The resolved config of a run directory."""
    path = Path(run) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{str(run)!r} is not a run directory: {CONFIG} is missing",
                              "pass a directory written by `dapeng train`")
    return load_config(path)


def evaluate(
    run: str | Path, split: str = "test", precision: str | None = None, batch_size: int | None = None
) -> dict[str, Any]:
    """Evaluate a run's model (`RUN/model`) on one split of its data: `eval`, `test` or `train`.

    Args:
        run: the run directory.
        split: `eval`, `test` or `train`.
        precision: `fp32`, `bf16` or `auto`; default: the precision the run was trained in, so
            the figures match the run's own report on any machine.
        batch_size: default: the run's eval batch size.

    Returns:
        `{"precision": the precision used, "metrics": {name: value}}`.
    """
    if split not in ("train", "eval", "test"):
        raise ConfigError(f"split {split!r} is not one of train, eval, test")
    run = Path(run)
    cfg = load_run_config(run)
    from dapeng.hub.artifact import load_artifact, trained_precision
    from dapeng.train.trainer import Trainer

    artifact = load_artifact(run / "model", precision="fp32")
    records = getattr(load_splits(cfg), split)
    if not records:
        raise ConfigError(f"the run's data has no {split!r} split", "try --split eval")
    items = artifact.task.encode(records)
    # the run's own evaluation batches: a contrastive loss depends on how many negatives a batch holds
    size = batch_size or cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    trainer = Trainer(artifact.model, artifact.task, precision=precision or trained_precision(artifact.meta),
                      device=cfg.train.device, batch_size=size, eval_batch_size=size)
    return {"precision": trainer.precision, "metrics": _strip(trainer.evaluate(items, prefix=split))}


# ----------------------------------------------------------------------------- helpers


def _strip(metrics: dict[str, float]) -> dict[str, float]:
    """`eval/accuracy` → `accuracy` inside the per-split sections of metrics.json."""
    return {k.split("/", 1)[-1]: v for k, v in metrics.items()}


def _data_name(cfg: RunConfig) -> str:
    return cfg.data.dataset or (Path(cfg.data.train).name if cfg.data.train else "data")


def _card_facts(cfg: RunConfig, trainable_fraction: float = 1.0, train: dict[str, Any] | None = None) -> dict[str, str]:
    facts = {"data": f"Trained on `{_data_name(cfg)}`"}
    m = cfg.model
    if m.init:
        how = (f"LoRA rank {m.lora.rank} on {', '.join(m.lora.targets)}, merged into the weights" if m.lora
               else f"the lowest {m.freeze} layer groups frozen" if m.freeze
               else "gradual unfreezing" if m.gradual_unfreezing else "full fine-tuning")
        facts["summary"] = (f"A `{m.name}` model fine-tuned from `{m.init}` for `{cfg.task}` ({how}; "
                            f"{trainable_fraction:.2%} of the parameters trained).")
    if cfg.data.dataset:
        try:
            from dapeng.data.catalog import CATALOG

            entry = CATALOG.get(cfg.data.dataset) if hasattr(CATALOG, "get") else None
            license_ = getattr(entry, "license", None) if entry is not None else None
            if license_:
                facts["license"] = f"Data license: {license_}."
            description = getattr(entry, "description", None) if entry is not None else None
            if description:
                facts["data"] += f": {description}"
        except ImportError:
            pass
    if cfg.distill:
        d = cfg.distill
        facts["summary"] = (facts.get("summary", f"A `{m.name}` model for `{cfg.task}`.") +
                            f" Distilled from the teacher `{d.teacher}` ({d.loss} loss, alpha {d.alpha},"
                            f" temperature {d.temperature}).")
    facts["data"] += f" (seed {cfg.data.seed}{f', first {cfg.data.limit} records' if cfg.data.limit else ''})."
    if cfg.data.labels_per_class or cfg.data.labelled_fraction:
        facts["data"] += " " + _few_labels(cfg, train or {})
    return facts


def _few_labels(cfg: RunConfig, train: dict[str, Any]) -> str:
    """The card's sentence on a few-label split and what learnt from its unlabeled rest."""
    d, semi = cfg.data, cfg.semi
    kept = f"{d.labels_per_class} per class" if d.labels_per_class else f"{d.labelled_fraction:.1%} of them"
    counts = (f" ({train['train_records']:,} records; {train['unlabeled_records']:,} more without their labels)"
              if "train_records" in train and "unlabeled_records" in train else "")
    used = (f"The unlabeled records were learnt from by {'FixMatch' if semi.method == 'fixmatch' else 'pseudo-labelling'}"
            f" (confidence threshold {semi.threshold}, {semi.ratio} unlabeled per labelled item, weight {semi.weight})."
            if semi else "The unlabeled records were not used.")
    return f"Only the labels of a seeded, stratified few of the training records were kept: {kept}{counts}. {used}"


def _check_run_dir(cfg: RunConfig, out: Path, has_checkpoint: bool, resume: bool) -> None:
    if resume:
        if not has_checkpoint:
            raise CheckpointError(f"nothing to resume in {str(out)!r}: no checkpoint yet",
                                  "run again without --resume")
        saved = out / CONFIG
        if saved.is_file():
            before = load_config(saved).model_dump(mode="json")
            now = cfg.model_dump(mode="json")
            changed = sorted(_diff(before, now))
            if changed:
                raise ConfigError(f"--resume with a different config: {', '.join(changed[:5])} changed",
                                  "resume with the run's own config.yaml, or train into a new --out")
    elif has_checkpoint:
        raise ConfigError(f"{str(out)!r} already holds a run", "pass --resume to continue it, or choose another --out")


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [k for key in keys for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if a != b else []
