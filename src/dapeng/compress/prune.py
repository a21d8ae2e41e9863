"""Magnitude pruning (`torch.nn.utils.prune`) with recovery fine-tuning through the Trainer.

* unstructured: each weight matrix loses its `sparsity` fraction of smallest-magnitude entries
  (L1), Linear, Conv and recurrent (`weight_ih_l*`, `weight_hh_l*`) weights alike;
* structured: each Linear/Conv weight loses its `sparsity` fraction of output rows/filters
  with the smallest L2 norm (zeroed, not removed: the architecture stays the same).

Embeddings and the classification head keep all their weights: the first are lookup tables
(pruning a row deletes a word), the second is a few rows that every prediction reads.
`torch.nn.utils.prune` picks the masks and is made permanent at once (`prune.remove`): its
`weight = weight_orig * mask` pre-hook only runs when a module is called, and dapeng's fused
projections read `layer.weight` without calling the layer. During recovery fine-tuning a
Trainer callback (`KeepMasks`) zeroes the pruned weights again after every optimizer step.
The saved Artifact is an ordinary model with zeros in it (dense storage: the same size).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from dapeng.errors import ConfigError

__all__ = ["PRUNABLE", "finetune", "prune_artifact", "KeepMasks", "prune_model", "pruned_weights", "sparsity_of"]

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.RNNBase)
_RECURRENT_WEIGHT = re.compile(r"weight_(ih|hh)_l\d+(_reverse)?")


def pruned_weights(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """The (module, parameter name, qualified name) triples pruning applies to; the head is left out."""
    head = getattr(model, "head", None)
    found = []
    for name, module in model.named_modules():
        if module is head or not isinstance(module, PRUNABLE):
            continue
        if isinstance(module, nn.RNNBase):
            found += [(module, p, f"{name}.{p}") for p, _ in module.named_parameters(recurse=False)
                      if _RECURRENT_WEIGHT.fullmatch(p)]
        else:
            found.append((module, "weight", f"{name}.weight"))
    return found


def prune_model(model: nn.Module, sparsity: float, structured: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of `model` (zeros made permanent) and its masks, {parameter name: bool mask}.

    Raises:
        ValueError: `sparsity` outside (0, 1), or nothing to prune.
    """
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is not a fraction in (0, 1)")
    model = copy.deepcopy(model)
    targets = pruned_weights(model)
    if structured:  # an RNN's gate rows are tied across its four blocks: zeroing rows breaks the cell
        targets = [t for t in targets if not isinstance(t[0], nn.RNNBase)]
    if not targets:
        raise ValueError("the model has no Linear, Conv or recurrent weights to prune besides its head")
    masks = {}
    for module, param, qualified in targets:
        if structured:
            torch_prune.ln_structured(module, param, amount=sparsity, n=2, dim=0)
        else:
            torch_prune.l1_unstructured(module, param, amount=sparsity)
        masks[qualified] = getattr(module, f"{param}_mask").bool()
        torch_prune.remove(module, param)
    return model, masks


class KeepMasks:
    """Trainer callback: pruned weights back to zero after every optimizer step."""

    def __init__(self, model: nn.Module, masks: dict[str, Any]) -> None:
        params = dict(model.named_parameters())
        self.pairs = [(params[name], mask) for name, mask in masks.items()]

    def on_step_end(self, trainer: Any) -> None:
        with torch.no_grad():
            for param, mask in self.pairs:
                param.mul_(mask.to(param.device))


def sparsity_of(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, float]:
    """Zero fractions: over the pruned weights (`names`, default all prunable) and over all parameters."""
    params = dict(model.named_parameters())
    chosen = [params[n] for n in (names if names is not None else [q for _, _, q in pruned_weights(model)])
              if n in params]
    zeros = sum(int((p == 0).sum()) for p in chosen)
    total = sum(p.numel() for p in chosen)
    all_zeros = sum(int((p == 0).sum()) for p in params.values())
    all_total = sum(p.numel() for p in params.values())
    return {"pruned_weights": zeros / max(total, 1), "all_parameters": all_zeros / max(all_total, 1)}


def finetune(model: nn.Module, masks: dict[str, Any], task: Any, train_items: Sequence[Any],
             eval_items: Sequence[Any], trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Recovery fine-tuning of a pruned model through the Trainer, its masks held; returns its summary."""
    from dapeng.train.trainer import Trainer

    trainer = Trainer(model, task, checkpoint_dir=None, **trainer_kwargs)
    trainer.add_callback(KeepMasks(trainer.model, masks))
    summary = trainer.fit(train_items, eval_items or None)
    trainer.load_best()
    model.to("cpu")
    return {k: v for k, v in summary.items() if isinstance(v, int | float | str)}


def prune_artifact(
    artifact: Any,
    sparsity: float,
    out: str | Path,
    *,
    structured: bool = False,
    train_items: Sequence[Any] = (),
    eval_items: Sequence[Any] = (),
    finetune_epochs: int = 0,
    trainer_kwargs: dict[str, Any] | None = None,
    metric: str = "accuracy",
) -> dict[str, Any]:
    """Prune a loaded Artifact, fine-tune it to recover, make the pruning permanent and save it.

    Args:
        artifact: a float `dapeng.hub.artifact.Artifact`.
        sparsity: the fraction of each pruned weight to zero.
        out: the Artifact folder to write.
        structured: prune whole output rows/filters (L2) instead of single weights (L1).
        train_items: encoded training items for the recovery fine-tuning.
        eval_items: encoded eval items: the metric before, after pruning and after fine-tuning.
        finetune_epochs: recovery epochs (0: none).
        trainer_kwargs: the Trainer's arguments (the run's `train:` section); `epochs` is replaced.
        metric: the task metric reported.

    Returns:
        `{"sparsity", "structured", metric: {"before", "pruned", "finetuned"}, "size_mb", "model"}`.
    """
    from dapeng.compress.quantize import evaluate_model, weights_size_mb
    from dapeng.hub.artifact import save_artifact

    if artifact.meta.get("quantization"):
        raise ConfigError(f"{str(artifact.path)!r} is quantized", "prune its float parent instead")
    try:
        model, masks = prune_model(artifact.model.cpu().float(), sparsity, structured)
    except ValueError as err:
        raise ConfigError(str(err), "choose e.g. --sparsity 0.5") from None
    names = list(masks)
    figures: dict[str, float | None] = {"before": None, "pruned": None, "finetuned": None}
    if eval_items:
        figures["before"] = evaluate_model(artifact.model, artifact.task, eval_items)[metric]
        figures["pruned"] = evaluate_model(model, artifact.task, eval_items)[metric]
    summary: dict[str, Any] = {}
    if finetune_epochs > 0:
        if not train_items:
            raise ConfigError("recovery fine-tuning needs training items", "prune a run directory, or --finetune-epochs 0")
        summary = finetune(model, masks, artifact.task, train_items, eval_items,
                           {**(trainer_kwargs or {}), "epochs": finetune_epochs, "device": "cpu"})
    model.eval()
    final = evaluate_model(model, artifact.task, eval_items) if eval_items else {}
    if eval_items and finetune_epochs > 0:
        figures["finetuned"] = final[metric]
    sparsity_report = sparsity_of(model, names)
    meta = artifact.meta
    how = f"{'structured (L2, rows)' if structured else 'unstructured (L1)'} magnitude pruning at {sparsity:.0%}"
    save_artifact(
        out, model=model, model_name=meta["model"]["name"], model_kwargs=meta["model"].get("kwargs", {}),
        task_name=meta["task"], task_state=artifact.task.state(),
        metrics={"eval": final, "pruning": {"method": how, "finetune_epochs": finetune_epochs, **sparsity_report}},
        card={"summary": f"`{meta['model']['name']}` from `{artifact.path}` after {how}"
                         f"{f', fine-tuned {finetune_epochs} epoch(s)' if finetune_epochs else ''}."},
        parent=str(artifact.path), precision="fp32",
    )
    return {"sparsity": sparsity_report, "structured": structured, metric: figures,
            "size_mb": weights_size_mb(model), "finetune": summary, "model": str(out)}
