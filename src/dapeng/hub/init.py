"""Fine-tuning from pretrained weights: `model.init: minilm-l6` in a run config.

`pretrained_task_options(init, task_name)` gives a causal-lm or sentence-embedding task the
pretrained model's own tokenizer, chat template and special ids before `setup`;
`load_init(init, name, overrides, task)` loads the hub model (or Artifact folder) named by
`model.init`, hands its tokenizer to the task, and returns the model with a fresh head
sized for the task (`reset_head`) whenever the task or its label count differs from the
pretrained one. `model.kwargs` may change what has no weights (`pooling`, `dropout`);
anything that changes a weight's shape is an error naming the key. A self-supervised
model (`masked-lm`, `contrastive`) is a backbone for any later task: its pretraining head
(the MLM head, the projection head) is left behind, and the weights not carried over are
logged (`dapeng.hub.init`) and listed in `skipped_weights(model)`.

The fine-tuning transforms themselves (LoRA, freezing, gradual unfreezing, layer-wise
learning rates) are training transforms: `dapeng.train.finetune`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from dapeng.errors import ConfigError, ModelError

__all__ = ["load_init", "pretrained_task_options", "resolve_init", "skipped_weights"]

_log = logging.getLogger(__name__)

# Keys of a pretrained model's kwargs that `model.kwargs` may override: they own no pretrained
# weights (a tagger's CRF is part of the head: fresh unless the pretrained model had one that fits).
_OVERRIDABLE = {"pooling", "dropout", "activation_dropout", "crf"}
_HEAD_PREFIXES = ("head.", "lm_head.", "crf.", "mlm.")
# Constructor keys that only build a pretraining head: a run of another task starts without it.
_PRETRAINING_HEADS = {"mlm_head": False}


def resolve_init(init: str) -> Path:
    """The Artifact folder for `model.init`: an Artifact folder, a run directory or a hub name."""
    path = Path(init).expanduser()
    if path.is_dir():
        return path / "model" if (path / "model" / "dapeng.json").is_file() else path
    if "/" in init or "\\" in init or init.startswith((".", "~")):  # meant as a folder, not a hub name
        from dapeng.errors import NotFoundError

        raise NotFoundError(f"model folder {init!r} not found",
                            "pass a run directory, an Artifact folder or a hub name (`dapeng hub list`)")
    from dapeng.hub.store import resolve

    return resolve(init)


def pretrained_task_options(init: str, task_name: str) -> dict[str, Any]:
    """The task options a run inherits from the pretrained model named by `model.init`.

    Only for a task of the pretrained model's own kind that takes its tokenizer from it
    (`use_tokenizer`: causal-lm, sentence-embedding): its tokenizer, chat template, special
    token ids, context length, pooling recipe — so `setup` learns no throw-away tokenizer and
    the fine-tuned model keeps them. The run's own `task_options` override these.
    """
    import inspect

    from dapeng.hub.artifact import read_meta, task_state_of
    from dapeng.tasks import TASKS

    factory = TASKS.get(task_name)
    path = resolve_init(init)
    meta = read_meta(path)
    if meta.get("task") != task_name or not hasattr(factory, "use_tokenizer"):
        return {}
    params = inspect.signature(factory).parameters
    return {k: v for k, v in task_state_of(path, meta).items() if k in params and v is not None}


def _adopt_tokenizer(task: Any, tokenizer_json: str) -> None:
    """Make the task encode text with the pretrained model's own tokenizer."""
    if hasattr(task, "use_tokenizer"):
        task.use_tokenizer(tokenizer_json)
        return
    if hasattr(task, "tokenizer"):
        from dapeng.data.tokenizers import load_tokenizer

        task.tokenizer = load_tokenizer(tokenizer_json)
        # text-classification derives its pad/unk ids from the tokenizer it holds
        finish = getattr(task, "_finish_tokenizer", None)
        if callable(finish):
            finish()
        return
    raise ConfigError(f"task {getattr(task, 'name', task)!r} can't take a pretrained tokenizer",
                      "use a text task with model.init, or unset model.init")


def load_init(init: str, name: str, overrides: dict[str, Any], task: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model of a run from pretrained weights.

    Args:
        init: a hub name, an Artifact folder or a run directory (`model.init`).
        name: the architecture the run asks for (`model.name`); must be the pretrained one's.
        overrides: `model.kwargs`: only keys that own no weights may differ from the pretrained ones.
        task: the run's task, already set up on the training records.

    Returns:
        (model, the constructor kwargs that rebuild it for the Artifact).

    Raises:
        ConfigError: `model.name` or `model.kwargs` don't fit the pretrained model.
        NotFoundError / CheckpointError: `model.init` can't be found or read.
    """
    from dapeng.hub.artifact import load_artifact
    from dapeng.models import create_model

    path = resolve_init(init)
    pretrained = load_artifact(path, precision="fp32")
    spec = pretrained.meta["model"]
    if name != spec["name"]:
        raise ConfigError(
            f"config key model.name: {name!r}, but model.init {init!r} is a {spec['name']!r}",
            f"set model.name: {spec['name']}",
        )
    kwargs = dict(spec.get("kwargs", {}))
    shaped = sorted(set(overrides) - _OVERRIDABLE)
    changed = [k for k in shaped if kwargs.get(k) != overrides[k]]
    if changed:
        raise ConfigError(
            f"config key model.kwargs.{changed[0]}: can't change a pretrained model's shape",
            f"only {', '.join(sorted(_OVERRIDABLE))} may be set with model.init",
        )
    kwargs.update(overrides)
    tokenizer = path / "tokenizer.json"
    if tokenizer.is_file():
        _adopt_tokenizer(task, tokenizer.read_text())
    wanted = task.model_kwargs().get("num_labels")
    same_task = getattr(task, "name", None) == pretrained.meta["task"]
    if wanted is not None:
        kwargs["num_labels"] = wanted
    if not same_task:
        kwargs.update({k: off for k, off in _PRETRAINING_HEADS.items() if k in kwargs and k not in overrides})
    model = create_model(spec["name"], kwargs, given=overrides, key="config key model.kwargs.")
    skipped = _copy_backbone(pretrained.model, model,
                             keep_head=same_task and wanted in (None, spec["kwargs"].get("num_labels")))
    model._dapeng_skipped_weights = skipped  # what `skipped_weights` reports
    if skipped:
        shown = ", ".join(skipped[:6]) + (f" … ({len(skipped)} in all)" if len(skipped) > 6 else "")
        _log.info("model.init %s: backbone loaded; left behind: %s", init, shown)
    return model, kwargs


def skipped_weights(model: nn.Module) -> list[str]:
    """The pretrained weights `load_init` did not carry into `model` (its heads), in state-dict order."""
    return list(getattr(model, "_dapeng_skipped_weights", []))


def _copy_backbone(src: nn.Module, dst: nn.Module, keep_head: bool) -> list[str]:
    """Copy every pretrained weight into `dst`; the head too when `keep_head`, else it stays fresh.

    Returns:
        The pretrained weights left behind.
    """
    state = src.state_dict()
    own = dst.state_dict()
    take = {k: v for k, v in state.items() if keep_head or not k.startswith(_HEAD_PREFIXES)}
    bad = [k for k in own if not k.startswith(_HEAD_PREFIXES) and (k not in take or take[k].shape != own[k].shape)]
    if bad:
        raise ModelError(f"pretrained weights don't fit the model at {bad[0]}", "check model.kwargs")
    take = {k: v for k, v in take.items() if k in own and v.shape == own[k].shape}
    dst.load_state_dict(take, strict=False)
    return [k for k in state if k not in take]
