"""Linear projections run the fast way for the shapes and dtypes at hand.

* `project_together`: several linear layers that read the same input, as one GEMM when that
  pays. On CPU one (M × D) @ (D × (N1 + N2 + …)) product is markedly faster than the separate
  small ones (better blocking, one pass over the input), so q/k/v and SwiGLU's gate/up run
  together while training and prefilling. The layers keep their own weights and names
  (checkpoints, LoRA and quantization see ordinary `nn.Linear`s); the concatenated weight
  is built per call, which costs a weight copy, so products of a few rows skip it. A single
  row (decoding one sequence) of a wide group multiplies a cached, packed (in, out) copy
  instead, which MKL streams about 1.4x faster (`_one_row_weight`).
* `linear`: one layer, where activations may be fp32 while the weights are bf16
  ("weight-only bf16", what `LlamaLM.generate` uses on CPUs without native bf16). Products
  of a few rows (decoding) go to `cpu_matmul`'s kernel, which reads bf16 or fp32 weights and
  accumulates in fp32. Without it, a bf16 GEMM runs reference kernels at ~9 GFLOP/s whatever
  the shape, while fp32 reaches 30–70: a product of 8 rows or more upcasts the (small) weight
  and multiplies in fp32 (bit-identical weights, fp32 accumulation); a matrix-vector product,
  bound by memory bandwidth, reads the weights as they are, in bf16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.layers import cpu_matmul

# below this many rows the weight copy costs more than the bigger GEMM saves
MIN_ROWS = 128
# weight-only bf16: from this many rows upcast the weight, unless it is larger than
# UPCAST_MAX_WEIGHT elements (a vocabulary projection: converting it costs more than it saves)
UPCAST_MIN_ROWS = 8
UPCAST_MAX_WEIGHT = 1 << 22


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """`layer(x)`, also when `x` is fp32 and a plain `nn.Linear`'s weight is bf16; the result has x's dtype."""
    hooked = layer._forward_hooks or layer._forward_pre_hooks  # keep them firing where layer(x) can run
    if type(layer) is not nn.Linear or (hooked and layer.weight.dtype == x.dtype):
        return layer(x)
    return linear_weight(x, layer.weight, layer.bias)


def linear_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in x's dtype, for fp32 activations over bf16 weights as well (see above)."""
    if (y := cpu_matmul.matmul(x, weight, bias)) is not None:
        return y
    if weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.float32 and rows >= UPCAST_MIN_ROWS and weight.numel() <= UPCAST_MAX_WEIGHT:
        return F.linear(x, weight.float(), None if bias is None else bias.float())
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def project_fused(x: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor | None:
    """The outputs of `layers` concatenated on the last dim, from one matmul; None when that doesn't pay or apply."""
    if not all(type(layer) is nn.Linear for layer in layers):
        return None
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    rows = x.numel() // x.shape[-1]
    if rows == 1:
        packed = _one_row_weight(x, layers)
        if packed is None:
            return None
        weight_t, bias = packed
        return x @ weight_t if bias is None else torch.addmm(bias, x.reshape(1, -1), weight_t).view(*x.shape[:-1], -1)
    if rows < MIN_ROWS:
        return None
    weight = torch.cat([layer.weight for layer in layers]).to(x.dtype)
    bias = None if biases[0] is None else torch.cat(biases).to(x.dtype)
    return F.linear(x, weight, bias)


def project_together(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]`, computed as one matmul when all are plain `nn.Linear`."""
    fused = project_fused(x, layers)
    if fused is None:
        return [linear(x, layer) for layer in layers]
    return list(fused.split([layer.out_features for layer in layers], dim=-1))


def _one_row_weight(
    x: torch.Tensor, layers: Sequence[nn.Linear]
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The layers' weights packed as one contiguous (in, out₁ + out₂ + …) fp32 matrix, for a single row.

    Decoding one sequence multiplies one row by each weight: a matrix-vector product bound by
    memory bandwidth. MKL streams a wide matrix (more outputs than inputs, as q|k|v and
    gate|up are) markedly faster as `x @ W` with W (in, out) contiguous than as `x @ Wᵀ`
    from the (out, in) storage of `nn.Linear` (one AVX2 thread: 12–13 GB/s against 8–9 for
    SmolLM2's gate/up), and one product for the group saves the calls of the others. The
    copy is built once and kept on the first layer; it is rebuilt when any weight changes
    (another tensor, or its version counter moved by an in-place update such as a LoRA merge).
    It costs the group's size in memory again; narrow groups, training and other dtypes or
    devices never build one.
    """
    weights = [layer.weight for layer in layers]
    k = x.shape[-1]
    if (
        x.dtype != torch.float32
        or x.device.type != "cpu"
        or sum(w.shape[0] for w in weights) <= k
        or any(w.dtype != torch.float32 for w in weights)
        or (torch.is_grad_enabled() and any(w.requires_grad for w in weights))
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
    ):
        return None
    biases = [layer.bias for layer in layers]  # all or none: project_fused checked
    key = tuple((w.data_ptr(), w._version, tuple(w.shape)) for w in weights) + tuple(id(layer) for layer in layers)
    cache = layers[0].__dict__.setdefault("_one_row_packed", {})
    cached = cache.get(len(layers))
    if cached is None or cached[0] != key:
        weight_t = torch.cat([w.detach() for w in weights]).t().contiguous()
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        cached = (key, (weight_t, bias))
        cache[len(layers)] = cached
    return cached[1]
