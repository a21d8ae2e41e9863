"""Post-training int8 quantization with an accuracy gate: `quantize(model, method)`, `quantize_artifact(...)`.

The int8 layers themselves live in `dapeng.layers.quantized` (so the hub can rebuild a
quantized Artifact); this module chooses, calibrates and measures:

* `quantize(model, method, task, calibration)` → a quantized copy and its spec;
* `quantize_artifact(artifact, method, eval_items, ...)` measures the task's accuracy on the
  eval items before and after, refuses (a `DapengError`) to write a model that loses more
  than `max_drop` points, and saves the rest as an Artifact whose `dapeng.json` records the
  `quantization` spec, its parent and both accuracies.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dapeng.errors import ConfigError, DapengError
from dapeng.layers.quantized import METHODS, quantize_layers, static_targets

__all__ = ["METHODS", "calibrate", "evaluate_model", "quantize", "quantize_artifact", "weights_size_mb"]


def evaluate_model(model: nn.Module, task: Any, items: Sequence[Any], batch_size: int = 64) -> dict[str, float]:
    """The task's loss and metrics over `items` in fp32 on the CPU (`Trainer.evaluate`), without prefixes."""
    from dapeng.train.trainer import Trainer

    trainer = Trainer(model, task, precision="fp32", device="cpu", batch_size=batch_size, eval_batch_size=batch_size)
    return {k.split("/", 1)[-1]: v for k, v in trainer.evaluate(items, prefix="eval").items()}


@torch.inference_mode()
def calibrate(model: nn.Module, task: Any, items: Sequence[Any], names: Sequence[str],
              batch_size: int = 32) -> dict[str, float]:
    """The largest absolute input each named layer of `model` sees over `items` (forward pre-hooks)."""
    seen = dict.fromkeys(names, 0.0)

    def observe(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] = max(seen[name], float(args[0].detach().abs().max()))
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(observe(name)) for name in names]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            task.predict(model, task.collate(list(items[start:start + batch_size])))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return seen


def quantize(model: nn.Module, method: str, task: Any = None,
             calibration: Sequence[Any] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """A quantized copy of `model` (left unchanged) and the spec that rebuilds it.

    Args:
        model: a float model (on the CPU).
        method: `int8-dynamic`, `int8-weight-only`, `int8-static` or `int8-groupwise`.
        task: the model's task, for `int8-static` (runs the calibration batches).
        calibration: encoded training items whose inputs set the static input scales.

    Raises:
        ConfigError: an unknown method, or `int8-static` without calibration items.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}", f"choose one of {', '.join(METHODS)}")
    quantized = copy.deepcopy(model).cpu().float().eval()
    absmax = None
    if method == "int8-static":
        if task is None or not len(calibration):
            raise ConfigError("int8-static needs calibration samples", "pass --calibration N (training items, e.g. 256)")
        absmax = calibrate(quantized, task, calibration, static_targets(quantized))
    spec = quantize_layers(quantized, method, absmax)
    if not spec["layers"]:
        raise ConfigError(f"the model has no layer that {method} quantizes", "int8-static also covers Conv2d layers")
    if method == "int8-static":
        spec["calibration"] = len(calibration)
    return quantized, spec


def weights_size_mb(model: nn.Module) -> float:
    """Bytes of the model's tensors (what model.safetensors holds) in MB, tied tensors counted once."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values()) / 1e6


def quantize_artifact(
    artifact: Any,
    method: str,
    eval_items: Sequence[Any],
    out: str | Path,
    *,
    calibration: Sequence[Any] = (),
    max_drop: float = 0.5,
    metric: str = "accuracy",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Quantize a loaded Artifact, measure it against the original and save it if it passes the gate.

    Args:
        artifact: a `dapeng.hub.artifact.Artifact` (float).
        method: one of `METHODS`.
        eval_items: encoded items with labels, for the before/after metric.
        out: the Artifact folder to write.
        calibration: encoded training items (`int8-static`).
        max_drop: the largest drop of `metric` allowed, in points (percent).
        metric: the task metric the gate reads.
        batch_size: evaluation batch size.

    Returns:
        `{"method", "before", "after", "drop", "size_mb": {"before", "after"}, "layers", "model"}`.

    Raises:
        DapengError: the quantized model loses more than `max_drop` points (nothing is written).
    """
    from dapeng.hub.artifact import save_artifact

    if artifact.meta.get("quantization"):
        raise ConfigError(f"{str(artifact.path)!r} is already quantized", "quantize its float parent instead")
    model = artifact.model.cpu().float().eval()
    before = evaluate_model(model, artifact.task, eval_items, batch_size)
    if metric not in before:
        raise ConfigError(f"the task reports no {metric!r} metric", f"its metrics: {', '.join(before)}")
    quantized, spec = quantize(model, method, artifact.task, calibration)
    after = evaluate_model(quantized, artifact.task, eval_items, batch_size)
    drop = 100.0 * (before[metric] - after[metric])
    if drop > max_drop:
        raise DapengError(
            f"{method} loses {drop:.2f} points of {metric} ({100 * before[metric]:.2f} → {100 * after[metric]:.2f}), "
            f"more than --max-drop {max_drop}; nothing written",
            "try int8-weight-only, more --calibration samples, or a larger --max-drop",
        )
    meta = artifact.meta
    spec["metric"] = {"name": metric, "before": before[metric], "after": after[metric], "items": len(eval_items)}
    save_artifact(
        out, model=quantized, model_name=meta["model"]["name"], model_kwargs=meta["model"].get("kwargs", {}),
        task_name=meta["task"], task_state=artifact.task.state(), metrics={"eval": after},
        card={"summary": f"`{meta['model']['name']}` quantized with {method} from `{artifact.path}`: eval {metric} "
                         f"{before[metric]:.4f} → {after[metric]:.4f}."},
        parent=str(artifact.path), quantization=spec, precision="fp32",
    )
    return {"method": method, "before": before[metric], "after": after[metric], "drop": drop,
            "size_mb": {"before": weights_size_mb(model), "after": weights_size_mb(quantized)},
            "layers": len(spec["layers"]), "model": str(out)}
