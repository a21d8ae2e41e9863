"""Attention maps: every layer's and head's weights, rollout across layers, an LLM's
attention over its prompt.

The weights come from `dapeng.layers.attention.capture_attention(model)`: inside it every
attention layer also records its (B, H, T, S) weights, in layer order; outside it
attention runs through SDPA and materialises none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dapeng.errors import ModelError


def capture(model: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run `run()` (a forward of `model`) and return its output and the attention maps.

    Raises:
        ModelError: the model has no attention layers.
    """
    from dapeng.layers.attention import capture_attention

    with torch.no_grad(), capture_attention(model) as maps:
        out = run()
    maps = [m.detach().float() for m in maps]
    if not maps:
        raise ModelError(
            f"{type(model).__name__} has no attention layers",
            "use method ig or saliency, or a transformer model",
        )
    return out, maps


def capture_with_inputs(
    model: nn.Module, run: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor], tuple[nn.Module, torch.Tensor] | None]:
    """`capture`, plus the last self-attention layer and the input it received (B, S, D).

    The input is what `value_weighted` needs to tell how much each token actually passes
    on through that layer; None when the model has no such layer with `v`/`o` projections.
    """
    from dapeng.layers.attention import MultiHeadAttention

    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    seen: dict[int, tuple[nn.Module, torch.Tensor]] = {}

    def remember(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        if context is None and kwargs.get("kv") is None:  # self-attention only
            seen[len(seen)] = (module, args[0].detach())

    hooks = [m.register_forward_pre_hook(remember, with_kwargs=True) for m in layers]
    try:
        out, maps = capture(model, run)
    finally:
        for hook in hooks:
            hook.remove()
    last = seen.get(len(seen) - 1)
    if last is None or not all(isinstance(getattr(last[0], n, None), nn.Linear) for n in ("v", "o")):
        last = None
    return out, maps, last


def value_weighted(weights: torch.Tensor, layer: nn.Module, inputs: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """What each token passes on through one attention layer (Kobayashi et al., 2020): (B, S).

    A weight says how much a query looks at a token, not how much of it arrives: a token
    whose transformed value `W_o v` is small passes on little however much it is looked at.
    The token's contribution to the queries the model reads is the norm of
    sum_h a_h W_o,h v_h, with a_h the head-h weight averaged over those queries.

    Args:
        weights: (B, H, T, S) the layer's attention weights.
        layer: the `MultiHeadAttention` layer (its `v` and `o` projections).
        inputs: (B, S, D) the layer's input (the normalised hidden states).
        queries: (B, T) how much each query position counts (e.g. the pooling's weights).
    """
    b, s, _ = inputs.shape
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    with torch.no_grad():
        v = nn.functional.linear(inputs.float(), layer.v.weight.float(), None)  # (B, S, Hkv*Dh), bias aside
        v = v.view(b, s, kv_heads, dim).repeat_interleave(heads // kv_heads, dim=2)  # (B, S, H, Dh)
        w_o = layer.o.weight.float().view(-1, heads, dim)  # (D, H, Dh)
        per_head = torch.einsum("bshd,ehd->bshe", v, w_o)  # (B, S, H, D)
        a = torch.einsum("bt,bhts->bhs", queries.float(), weights.float())  # (B, H, S)
        return torch.einsum("bhs,bshe->bse", a, per_head).norm(dim=-1)  # (B, S)


def query_weights(length: int, batch: int, mask: torch.Tensor | None, pooling: str | None) -> torch.Tensor:
    """(B, T) how much each position's output counts in the pooled vector the head reads."""
    if pooling == "cls":
        q = torch.zeros(batch, length)
        q[:, 0] = 1.0
        return q
    q = torch.ones(batch, length) if mask is None else mask.float().expand(batch, length)
    return q / q.sum(1, keepdim=True).clamp_min(1)


def rollout(maps: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output position draws on
    each input position once the residual paths of every layer are accounted for.

    Each layer's head-averaged weights are mixed with the identity (the residual stream),
    rows renormalised, and the layers multiplied from the first up.

    Args:
        maps: per layer (B, H, T, T) self-attention weights; cross-attention layers
            (T != S) are skipped, since they do not map the sequence onto itself.
        residual: the weight of the identity in each layer's mix.

    Returns:
        (B, T, T) whose rows sum to 1.
    """
    self_maps = [m for m in maps if m.shape[-1] == m.shape[-2]]
    if not self_maps:
        raise ModelError("no self-attention layers to roll out", "use method attention")
    batch, _, length, _ = self_maps[0].shape
    eye = torch.eye(length, dtype=torch.float32, device=self_maps[0].device).expand(batch, -1, -1)
    result = eye
    for weights in self_maps:
        mixed = residual * eye + (1 - residual) * weights.float().mean(1)  # (B, T, T)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        result = mixed @ result
    return result


def token_importance(roll: torch.Tensor, mask: torch.Tensor | None, pooling: str | None) -> torch.Tensor:
    """What the model's pooled output draws from each token: (B, T).

    A [CLS]-pooled encoder reads row 0 of the rollout; a mean- or max-pooled one reads
    every real token, so its rows are averaged (`query_weights`).
    """
    queries = query_weights(roll.shape[1], roll.shape[0], mask, pooling).to(roll.device)
    return torch.einsum("bt,bts->bs", queries, roll)


def prompt_attention(
    model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 1
) -> tuple[list[int], list[float], list[torch.Tensor]]:
    """Greedy-generate `new_tokens` tokens and return the attention of the last one.

    The last generated token is predicted at the position just before it, so that
    position's attention row, in every layer and head, is what the model looked at in the
    prompt (and earlier generated tokens) to produce it.

    Args:
        model: a decoder-only LM: input_ids (B, T) -> logits (B, T, V).
        prompt_ids: (1, P).

    Returns:
        The generated ids, their probabilities, and per layer the (H, S) attention row
        (S = P + new_tokens - 1) that produced the last of them.
    """
    ids = prompt_ids
    generated: list[int] = []
    probs: list[float] = []
    for step in range(new_tokens):
        last = step == new_tokens - 1
        if last:
            logits, maps = capture(model, lambda ids=ids: model(ids))
        else:
            with torch.no_grad():
                logits = model(ids)
        p = logits[0, -1].float().softmax(-1)
        token = int(p.argmax())
        generated.append(token)
        probs.append(float(p[token]))
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
    return generated, probs, [m[0, :, -1, :] for m in maps]
