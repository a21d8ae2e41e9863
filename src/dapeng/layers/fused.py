"""Linear projections run the fast way for the shapes and dtypes at hand.

* `project_together`: several linear layers that read the same input, as one GEMM when that
  pays. On CPU one (M × D) @ (D × (N1 + N2 + …)) product is markedly faster than the separate
  small ones (better blocking, one pass over the input), so q/k/v and SwiGLU's gate/up run
  together while training and prefilling. The layers keep their own weights and names
  (checkpoints, LoRA and quantization see ordinary `nn.Linear`s); the concatenated weight
  is built per call, which costs a weight copy, so products of a few rows (decoding) skip it:
  `cpu_matmul`'s kernel streams each layer's own weight faster than MKL would the copy.
* `linear`: one layer, where activations may be fp32 while the weights are bf16
  ("weight-only bf16", what `LlamaLM.generate` uses on CPUs without native bf16). Products
  of a few rows (decoding) go to `cpu_matmul`'s kernel, which reads bf16 or fp32 weights and
  accumulates in fp32; it takes bf16 activations over bf16 weights as well (decoding on CPUs
  with native bf16: `vdpbf16ps`). Without it, a bf16 GEMM runs reference kernels at ~9
  GFLOP/s whatever the shape, while fp32 reaches 30–70: a product of 8 rows or more upcasts
  the (small) weight and multiplies in fp32 (bit-identical weights, fp32 accumulation); a
  matrix-vector product, bound by memory bandwidth, reads the weights as they are, in bf16.
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
    # a hooked layer (tensor parallel's sharding, an explainer's capture) must run as itself
    if not all(type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks) for layer in layers):
        return None
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    # an exported graph must not branch on the batch's size (torch.export would guard on it)
    if torch.compiler.is_exporting() or x.numel() // x.shape[-1] < MIN_ROWS:
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
