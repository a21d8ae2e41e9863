"""Several linear layers that read the same input, run as one GEMM when that pays.

On CPU one (M × D) @ (D × (N1 + N2 + …)) product is markedly faster than the separate
small ones (better blocking, one pass over the input), so q/k/v and SwiGLU's gate/up run
together while training and prefilling. The layers keep their own weights and names
(checkpoints, LoRA and quantization see ordinary `nn.Linear`s); the concatenated weight
is built per call, which costs a weight copy, so single-token decoding skips it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# below this many rows the weight copy costs more than the bigger GEMM saves
MIN_ROWS = 128


def project_together(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]`, computed as one matmul when all are plain `nn.Linear`."""
    rows = x.numel() // x.shape[-1]
    plain = all(type(layer) is nn.Linear for layer in layers)
    biases = [layer.bias for layer in layers] if plain else []
    if rows < MIN_ROWS or not plain or (any(b is None for b in biases) and not all(b is None for b in biases)):
        return [layer(x) for layer in layers]
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if biases[0] is None else torch.cat(biases)
    return list(F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1))
