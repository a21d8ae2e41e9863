"""Int8 layers: weights stored as int8 with per-output-channel fp32 scales, as plain tensors.

A quantized model is its float architecture with some layers swapped for these, so an
Artifact's `model.safetensors` holds ordinary int8 and fp32 tensors (no quantized tensor
types: they can't be saved with safetensors, and torch deprecates them) and `dapeng.json`
records which layers were swapped (`quantization: {"method", "layers": {name: kind}}`).
`prepare_quantized(model, spec)` performs the same swap on a freshly built model before
its weights load, which is how `dapeng.hub` rebuilds one without the compress package.

Methods (`METHODS`):
* `int8-dynamic` — Linear layers quantize their input per row at run time (absmax / 127)
  and multiply int8 × int8 → int32 (`torch._int_mm`, the kernel torchao's int8 dynamic uses).
* `int8-weight-only` — Linear layers keep fp32 activations; the int8 weight is applied by
  `dapeng.layers.cpu_matmul` for up to 64 rows (decoding steps: each int8 weight row widened
  to fp32 in registers), else `torch.ops.aten._weight_int8pack_mm` (fp32 × int8 with
  per-channel scales).
* `int8-static` — Linear and Conv2d layers quantize their input with one scale per layer
  calibrated on sample inputs (`input_absmax` of `quantize_layers`). Linear multiplies int8 × int8 as
  above; Conv2d computes the int8-valued convolution in fp32 (torch 2.13 has no int8 conv
  kernel on CPU outside the deprecated quantized-tensor ops), so it saves size, not time.
* `int8-groupwise` — weight-only, one scale and zero point per 32 inputs of each output row
  (asymmetric uint8, the group-wise layout of llama.cpp and torchao): finer than one scale a
  row, for LMs whose rows hold outliers. Weights that come from a 4-bit GGUF with 32-blocks
  (SmolLM2's Q4_1) lie on such a grid already, so they are stored exactly. Decoding-sized
  products run `dapeng.layers.cpu_matmul.matmul_groupwise`; layers whose input size isn't a
  multiple of 32 take the per-channel weight-only layer.
Every method also stores large `nn.Embedding` tables as int8 rows (weight-only: a lookup).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.layers.cpu_matmul import GROUP, matmul, matmul_groupwise

__all__ = [
    "METHODS", "GroupwiseEmbedding", "GroupwiseLinear", "Int8Conv2d", "Int8Embedding", "Int8Linear",
    "prepare_quantized", "quantize_layers", "static_targets",
]

METHODS = ("int8-dynamic", "int8-weight-only", "int8-static", "int8-groupwise")
UMAX = 255
# smaller tables (token types, a few labels) save nothing worth a lookup through scales
MIN_EMBEDDING_ROWS = 256
QMAX = 127


def _per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (dim 0): (int8 weight, fp32 scale (out,))."""
    w = weight.detach().float()
    scale = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-8) / QMAX  # (out,)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / scale.view(shape)).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a (N, K) activation: (int8 (N, K), fp32 scale (N, 1))."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / QMAX
    return torch.round(x / scale).clamp(-QMAX, QMAX).to(torch.int8), scale


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 (out, in) weight and fp32 per-output scales.

    Args:
        in_features: input size.
        out_features: output size.
        bias: whether the layer has a (fp32) bias.
        mode: "dynamic", "weight-only" or "static" (see the module docstring).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "dynamic") -> None:
        super().__init__()
        if mode not in ("dynamic", "weight-only", "static"):
            raise ValueError(f"unknown Int8Linear mode {mode!r}; choose dynamic, weight-only or static")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if mode == "static":
            self.register_buffer("input_scale", torch.ones(()))

    @classmethod
    def from_float(cls, layer: nn.Linear, mode: str) -> Int8Linear:
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, mode)
        new.qweight, new.scale = _per_channel(layer.weight)
        if layer.bias is not None:
            new.bias = layer.bias.detach().float().clone()
        return new

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 weight, for code that reads a Linear's weight directly."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).float()  # (N, in)
        if self.mode == "weight-only":
            # a few rows (decoding) stream the int8 weight through dapeng's kernel; else aten's
            y = matmul(x2, self.qweight, scale=self.scale)
            if y is None:
                y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale)
        else:
            if self.mode == "static":
                xs = self.input_scale.expand(x2.shape[0], 1)
                xq = torch.round(x2 / xs).clamp(-QMAX, QMAX).to(torch.int8)
            else:
                xq, xs = _quantize_rows(x2)
            y = torch._int_mm(xq, self.qweight.t()).float() * xs * self.scale  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def _groupwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uint8 per GROUP inputs of each row: (uint8 (N, K), scale (N, K/G), zero (N, K/G))."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / UMAX).clamp_min(1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, UMAX).to(torch.uint8)
    return q.reshape(n, k), scale, lo


def _dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    shape = (*q.shape[:-1], q.shape[-1] // GROUP, GROUP)
    return (q.float().reshape(shape) * scale[..., None] + zero[..., None]).reshape(q.shape)


class _Groupwise(nn.Module):
    """The buffers of a group-wise uint8 (rows, inputs) matrix and its product with activations."""

    def _init_groups(self, rows: int, inputs: int) -> None:
        self.register_buffer("qweight", torch.zeros(rows, inputs, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, inputs // GROUP))
        self.register_buffer("zero", torch.zeros(rows, inputs // GROUP))

    def _set_groups(self, weight: torch.Tensor) -> None:
        self.qweight, self.scale, self.zero = _groupwise(weight)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 matrix, for code that reads a layer's weight directly."""
        return _dequantize_groupwise(self.qweight, self.scale, self.zero)

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1]).float()
        y = matmul_groupwise(x2, self.qweight, self.scale, self.zero, bias)
        if y is None:  # more rows than a decoding step (prefill, batches): dequantize for aten's GEMM
            y = F.linear(x2, self.weight, bias)
        return y.reshape(*shape[:-1], self.qweight.shape[0]).to(dtype)


class GroupwiseLinear(_Groupwise):
    """`nn.Linear` with a group-wise uint8 weight (module docstring: `int8-groupwise`); in_features % 32 == 0."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if in_features % GROUP:
            raise ValueError(f"group-wise weights need in_features divisible by {GROUP}, not {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self._init_groups(out_features, in_features)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, layer: nn.Linear) -> GroupwiseLinear:
        new = cls(layer.in_features, layer.out_features, layer.bias is not None)
        new._set_groups(layer.weight)
        if layer.bias is not None:
            new.bias = layer.bias.detach().float().clone()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, uint8 groups of {GROUP}"


class GroupwiseEmbedding(_Groupwise):
    """`nn.Embedding` with group-wise uint8 rows; `linear` is the tied output projection over them."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        if embedding_dim % GROUP:
            raise ValueError(f"group-wise rows need embedding_dim divisible by {GROUP}, not {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_groups(num_embeddings, embedding_dim)

    @classmethod
    def from_float(cls, layer: nn.Embedding) -> GroupwiseEmbedding:
        new = cls(layer.num_embeddings, layer.embedding_dim, layer.padding_idx)
        new._set_groups(layer.weight)
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _dequantize_groupwise(F.embedding(ids, self.qweight), F.embedding(ids, self.scale),
                                     F.embedding(ids, self.zero))  # (..., D)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """`F.linear(x, self.weight)`, (…, D) → (…, rows), without building the fp32 table for a few rows."""
        return self._product(x, None)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, uint8 groups of {GROUP}"


class Int8Embedding(nn.Module):
    """`nn.Embedding` whose rows are int8 with one fp32 scale per row (a lookup, then a multiply)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, layer: nn.Embedding) -> Int8Embedding:
        new = cls(layer.num_embeddings, layer.embedding_dim, layer.padding_idx)
        new.qweight, new.scale = _per_channel(layer.weight)
        return new

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 table, for code that reads an embedding's weight (tied heads, slices)."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).float() * F.embedding(ids, self.scale[:, None])  # (..., D)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """`F.linear(x, self.weight)`: a tied output projection over the int8 table, (…, D) → (…, rows).

        A few rows (decoding) stream the int8 table through dapeng's kernel, never
        materialising the fp32 one; more go through aten's int8 × fp32 product.
        """
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.embedding_dim).float()
        y = matmul(x2, self.qweight, scale=self.scale)
        if y is None:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale)
        return y.reshape(*shape[:-1], self.num_embeddings).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class Int8Conv2d(nn.Module):
    """`nn.Conv2d` with int8 per-output-channel weights and a calibrated per-tensor input scale (static)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                 padding: Any, dilation: tuple[int, int], groups: int, bias: bool) -> None:
        super().__init__()
        self.conv_args = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
        self.register_buffer("qweight", torch.zeros(out_channels, in_channels // groups, *kernel_size, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self.register_buffer("input_scale", torch.ones(()))

    @classmethod
    def from_float(cls, layer: nn.Conv2d) -> Int8Conv2d:
        new = cls(**_conv_kwargs(layer))
        new.qweight, new.scale = _per_channel(layer.weight)
        if layer.bias is not None:
            new.bias = layer.bias.detach().float().clone()
        return new

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = torch.round(x.float() / self.input_scale).clamp(-QMAX, QMAX)  # int8 values, fp32 storage
        y = F.conv2d(xq, self.qweight.float(), None, **self.conv_args)  # (B, C_out, H', W')
        y = y * (self.input_scale * self.scale)[None, :, None, None]
        if self.bias is not None:
            y = y + self.bias[None, :, None, None]
        return y.to(x.dtype)


def _conv_kwargs(layer: nn.Conv2d) -> dict[str, Any]:
    return {"in_channels": layer.in_channels, "out_channels": layer.out_channels, "kernel_size": layer.kernel_size,
            "stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups,
            "bias": layer.bias is not None}


def _targets(model: nn.Module, method: str) -> dict[str, str]:
    """The layers `method` quantizes: name → kind ("linear", "embedding", "conv2d")."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    found = {}
    grouped = method == "int8-groupwise"
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            found[name] = "linear-groupwise" if grouped and module.in_features % GROUP == 0 else "linear"
        elif type(module) is nn.Embedding and module.num_embeddings >= MIN_EMBEDDING_ROWS:
            found[name] = "embedding-groupwise" if grouped and module.embedding_dim % GROUP == 0 else "embedding"
        elif type(module) is nn.Conv2d and method == "int8-static" and module.padding_mode == "zeros":
            found[name] = "conv2d"
    return found


def _mode(method: str) -> str:
    """Int8Linear's mode for `method` (group-wise: the per-channel weight-only layer where groups don't fit)."""
    return "weight-only" if method == "int8-groupwise" else method.removeprefix("int8-")


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def static_targets(model: nn.Module) -> list[str]:
    """The names of the layers whose input range `int8-static` calibrates."""
    return [name for name, kind in _targets(model, "int8-static").items() if kind != "embedding"]


def quantize_layers(model: nn.Module, method: str, input_absmax: dict[str, float] | None = None) -> dict[str, Any]:
    """Swap `model`'s Linear (and large Embedding; Conv2d for static) layers for int8 ones, in place.

    Args:
        model: a float model.
        method: one of `METHODS`.
        input_absmax: for `int8-static`, the largest absolute input each of `static_targets(model)`
            saw on calibration data (its input scale becomes that / 127).

    Returns:
        The spec `prepare_quantized` rebuilds the same structure from.
    """
    layers = _targets(model, method)
    if method == "int8-static":
        missing = [name for name in static_targets(model) if name not in (input_absmax or {})]
        if missing:
            raise ValueError(f"int8-static needs calibrated input ranges for {', '.join(missing[:3])}")
    mode = _mode(method)
    for name, kind in layers.items():
        old = model.get_submodule(name)
        builders = {"linear": lambda layer: Int8Linear.from_float(layer, mode), "embedding": Int8Embedding.from_float,
                    "conv2d": Int8Conv2d.from_float, "linear-groupwise": GroupwiseLinear.from_float,
                    "embedding-groupwise": GroupwiseEmbedding.from_float}
        new = builders[kind](old)
        if hasattr(new, "input_scale"):
            new.input_scale = torch.tensor(max(float(input_absmax[name]), 1e-8) / QMAX)
        _swap(model, name, new.to(old.weight.device))
    return {"method": method, "layers": layers}


def prepare_quantized(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Swap in the empty int8 layers `spec` names, so that a quantized Artifact's weights load into `model`.

    Raises:
        ValueError: an unknown method, or a named layer that the model lacks or of the wrong type.
    """
    method = spec.get("method")
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; this dapeng knows {', '.join(METHODS)}")
    mode = _mode(method)
    for name, kind in (spec.get("layers") or {}).items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r} to quantize") from None
        if kind == "linear" and isinstance(old, nn.Linear):
            new: nn.Module = Int8Linear(old.in_features, old.out_features, old.bias is not None, mode)
        elif kind == "linear-groupwise" and isinstance(old, nn.Linear) and old.in_features % GROUP == 0:
            new = GroupwiseLinear(old.in_features, old.out_features, old.bias is not None)
        elif kind == "embedding" and isinstance(old, nn.Embedding):
            new = Int8Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx)
        elif kind == "embedding-groupwise" and isinstance(old, nn.Embedding) and old.embedding_dim % GROUP == 0:
            new = GroupwiseEmbedding(old.num_embeddings, old.embedding_dim, old.padding_idx)
        elif kind == "conv2d" and isinstance(old, nn.Conv2d):
            new = Int8Conv2d(**_conv_kwargs(old))
        else:
            raise ValueError(f"layer {name!r} is a {type(old).__name__}, not a quantizable {kind}")
        _swap(model, name, new)
    return model

