"""Fine-tuning transforms: LoRA, freezing, gradual unfreezing and layer-wise learning rates.

They change what trains, not the model's function, so they are training transforms (this package),
applied the same way on every build of a run (a resumed run's checkpoint then fits the model):

    callbacks, groups = apply_finetune(model, lora={"rank": 8, "targets": ["all-linear"]})
    Trainer(model, task, callbacks=callbacks, param_groups=groups, ...)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dapeng.errors import ConfigError, ModelError

__all__ = ["GradualUnfreezing", "apply_finetune", "freeze", "layer_groups", "layerwise_lr_groups"]


def apply_finetune(
    model: nn.Module,
    *,
    lora: dict[str, Any] | None = None,
    freeze_groups: int = 0,
    gradual_unfreezing: tuple[int, int] | None = None,
    layerwise_decay: float | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
) -> tuple[list[Any], list[dict[str, Any]] | None]:
    """Apply the fine-tuning transforms to `model`; returns (Trainer callbacks, optimizer param groups).

    Args:
        lora: `apply_lora` arguments (`rank`, `alpha`, `targets`, `dropout`, `keep_trainable`):
            wrap linear layers with LoRA, which freezes the rest.
        freeze_groups: freeze the lowest N layer groups (`layer_groups`: 1 = embeddings only).
        gradual_unfreezing: (start, per_epoch): train the top `start` groups first, unfreeze
            `per_epoch` more each epoch.
        layerwise_decay: each lower layer group's learning rate is the one above × this.
        lr, weight_decay: the optimizer's, for the layer-wise groups.

    Raises:
        ConfigError: transforms that contradict each other, or LoRA targets that name no linear layer.
    """
    if lora and (freeze_groups or gradual_unfreezing):
        raise ConfigError("config keys model.lora and model.freeze/gradual_unfreezing are both set",
                          "LoRA already freezes the pretrained weights: use one of them")
    if freeze_groups and gradual_unfreezing:
        raise ConfigError("config keys model.freeze and model.gradual_unfreezing are both set",
                          "gradual unfreezing decides what is frozen each epoch: drop model.freeze")
    callbacks: list[Any] = []
    if lora:
        from dapeng.layers.lora import apply_lora

        rank = int(lora["rank"])
        try:
            apply_lora(model, rank=rank, alpha=lora.get("alpha") or 2.0 * rank,
                       targets=tuple(lora.get("targets", ("all-linear",))), dropout=lora.get("dropout", 0.0),
                       keep_trainable=tuple(lora.get("keep_trainable", ())))
        except ValueError as err:
            raise ConfigError(f"config key model.lora.targets: {err}", "name linear layers of the model") from None
    if freeze_groups:
        freeze(model, freeze_groups)
    if gradual_unfreezing:
        callbacks.append(GradualUnfreezing(*gradual_unfreezing))
    groups = layerwise_lr_groups(model, lr, layerwise_decay, weight_decay) if layerwise_decay else None
    return callbacks, groups


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters from the bottom up: [embeddings, block 0, …, block N-1, everything else (head, final norm)].

    Works for any model whose blocks are an `nn.ModuleList` named `layers` (transformer, lm).
    """
    blocks = getattr(model, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ModelError(f"{type(model).__name__} has no `layers` block list", "freezing by layer needs one")
    in_blocks = {id(p) for p in blocks.parameters()}
    embeddings = getattr(model, "embeddings", None) or model.get_input_embeddings()
    in_embed = {id(p) for p in embeddings.parameters()}
    rest = [p for p in model.parameters() if id(p) not in in_blocks and id(p) not in in_embed]
    return [list(embeddings.parameters()), *[list(b.parameters()) for b in blocks], rest]


def freeze(model: nn.Module, until: int) -> nn.Module:
    """Freeze the lowest `until` groups of `layer_groups` (1 = embeddings only); the rest train.

    Returns:
        The same model.
    """
    groups = layer_groups(model)
    for i, group in enumerate(groups):
        for p in group:
            p.requires_grad_(i >= until)
    return model


class GradualUnfreezing:
    """Trainer callback: start with only the top `start` groups trainable, unfreeze one more per epoch.

    All parameters stay in the optimizer (they are frozen after it is built), so a frozen
    group simply gets no gradient until its epoch comes.

    Args:
        start: groups trainable in the first epoch (1 = head only).
        per_epoch: groups unfrozen at each later epoch.
    """

    def __init__(self, start: int = 1, per_epoch: int = 1) -> None:
        self.start = start
        self.per_epoch = per_epoch

    def on_epoch_start(self, trainer: Any, **_: Any) -> None:
        groups = layer_groups(trainer.model)
        trainable = self.start + self.per_epoch * trainer.state.epoch
        freeze(trainer.model, max(0, len(groups) - trainable))


def layerwise_lr_groups(model: nn.Module, lr: float, decay: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups with layer-wise learning-rate decay: the top group gets `lr`, each lower one × `decay`.

    Biases and norm weights get no weight decay. Frozen parameters are left out.
    """
    groups = layer_groups(model)
    out = []
    for depth, params in enumerate(groups):
        scale = decay ** (len(groups) - 1 - depth)
        for no_wd in (False, True):
            # 1-D tensors are biases and norm gains: no weight decay (as the Trainer's own groups)
            chosen = [p for p in params if p.requires_grad and (p.ndim <= 1) == no_wd]
            if chosen:
                out.append({"params": chosen, "lr": lr * scale, "weight_decay": 0.0 if no_wd else weight_decay})
    return out
