"""KServe V2 (Open Inference Protocol) tensors: a task's inputs from them, its predictions into them.

The tensor names and types follow the task's declared `Capabilities`: one input named
after the task's input field (`text` and `tokens` as BYTES `[N]`; `image` as UINT8
`[N, H, W]` / `[N, H, W, C]` pixels, or BYTES `[N]` of base64 image files; `image+text` as the
two tensors `image` and `text`, one element each per instance), and outputs by
what `predict` gives (`label`: BYTES `label`, FP32 `score` and, with known labels, FP32
`probabilities` `[N, labels]`; `vector`: FP32 `embedding` `[N, D]`; `score`: FP32 `score` `[N]`; `tags` and `text`: one
BYTES element per input, tags as the prediction's JSON). Inputs come as JSON data or in
the binary tensor extension (`tritonclient`'s default); outputs are always JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from dapeng.errors import DapengError

__all__ = ["TensorSpec", "input_specs", "instances_from", "output_specs", "outputs_from", "with_binary_data"]

# The binary extension's header: the length of the JSON part of the body; binary tensors follow it.
BINARY_HEADER = b"inference-header-content-length"


class TensorSpec(NamedTuple):
    """A tensor's name, datatype and shape (-1: any size) as V2 metadata states them."""

    name: str
    datatype: str
    shape: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


def input_specs(capabilities: Any) -> list[TensorSpec]:
    """The input tensors a task reads: one, `image` and `text` for an image+text task, or a BYTES
    tensor per field of a record input (question, context)."""
    image = TensorSpec("image", "UINT8", [-1, -1, -1, -1])
    if capabilities.input == "image":
        return [image]
    if capabilities.input == "image+text":
        return [image, TensorSpec("text", "BYTES", [-1])]
    return [TensorSpec(field, "BYTES", [-1]) for field in capabilities.fields]


def output_specs(capabilities: Any, labels: Sequence[str] | None) -> list[TensorSpec]:
    """The output tensors of a task's predictions."""
    if capabilities.output == "label":
        specs = [TensorSpec("label", "BYTES", [-1]), TensorSpec("score", "FP32", [-1])]
        if labels:
            specs.append(TensorSpec("probabilities", "FP32", [-1, len(labels)]))
        return specs
    if capabilities.output == "vector":
        return [TensorSpec("embedding", "FP32", [-1, -1])]
    if capabilities.output == "score":
        return [TensorSpec("score", "FP32", [-1])]
    return [TensorSpec(capabilities.output, "BYTES", [-1])]


def instances_from(inputs: Sequence[Any], capabilities: Any, max_items: int) -> list[Any]:
    """The raw inputs (one per batch row) in V2 input tensors, for `Pipeline.to_records`.

    An image+text task reads two tensors of the same batch size, `image` and `text`, into
    `{"image": ..., "text": ...}` instances.

    Raises:
        DapengError: naming the tensor or field that is wrong.
    """
    specs = input_specs(capabilities)
    names = [t.name for t in inputs]
    if sorted(names) != sorted(s.name for s in specs):
        wanted = f"one tensor named {specs[0].name!r}" if len(specs) == 1 else f"tensors {[s.name for s in specs]}"
        raise DapengError(f"inputs: expected {wanted}, got {names}", "see GET /v2/models/NAME for the inputs it reads")
    columns = {t.name: _instances(t, next(s for s in specs if s.name == t.name), k, max_items)
               for k, t in enumerate(inputs)}
    if len(specs) == 1:
        return columns[specs[0].name]
    sizes = {name: len(values) for name, values in columns.items()}
    if len(set(sizes.values())) != 1:
        raise DapengError(f"inputs: the tensors' batch sizes differ: {sizes}", "send one element of each per instance")
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def _instances(tensor: Any, spec: TensorSpec, k: int, max_items: int) -> list[Any]:
    """The batch rows of one input tensor (`inputs[k]`) that `spec` describes."""
    at = f"inputs[{k}]"
    shape = list(tensor.shape)
    if not shape or not 1 <= shape[0] <= max_items:
        raise DapengError(f"{at}.shape: the first dimension is the batch size, 1 to {max_items}, not {shape}")
    if tensor.data is None:
        raise DapengError(f"{at}.data is missing", "send the elements, or binary data with binary_data_size")
    data = _flatten(tensor.data)
    if len(data) != _product(shape):
        raise DapengError(f"{at}.data: {len(data)} elements for shape {shape}")
    if tensor.datatype == "BYTES":
        if len(shape) > 2 or _product(shape[1:]) != 1:
            raise DapengError(f"{at}.shape: BYTES inputs are [N] or [N, 1], not {shape}")
        if not all(isinstance(x, str | bytes) for x in data):
            raise DapengError(f"{at}.data: BYTES elements must be strings")
        if spec.datatype == "UINT8":  # encoded image files: base64 in JSON, the bytes themselves in binary
            return [{"b64": x} if isinstance(x, str) else x for x in data]
        try:
            return [x.decode() if isinstance(x, bytes) else x for x in data]
        except UnicodeDecodeError:
            raise DapengError(f"{at}.data: BYTES text must be UTF-8") from None
    if spec.datatype != "UINT8" or tensor.datatype != "UINT8":
        raise DapengError(f"{at}.datatype: {spec.name!r} is {spec.datatype}, not {tensor.datatype}")
    if len(shape) not in (3, 4):
        raise DapengError(f"{at}.shape: images are [N, H, W] or [N, H, W, C], not {shape}")
    import numpy as np

    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in data):
        raise DapengError(f"{at}.data: UINT8 elements must be integers 0 to 255")
    pixels = np.asarray(data, dtype=np.uint8).reshape(shape)
    return list(pixels)


def outputs_from(
    predictions: Sequence[Any], capabilities: Any, labels: Sequence[str] | None, requested: Sequence[str] | None
) -> list[dict[str, Any]]:
    """V2 output tensors for the predictions (all outputs, or those `requested`).

    Raises:
        DapengError: for a requested output the task does not give.
    """
    specs = output_specs(capabilities, labels)
    names = [s.name for s in specs]
    unknown = [name for name in requested or () if name not in names]
    if unknown:
        raise DapengError(f"outputs: the model gives no {unknown} output", f"it gives {names}")
    n = len(predictions)
    out = []
    for spec in specs:
        if requested and spec.name not in requested:
            continue
        if spec.name == "label":
            data: list[Any] = [str(p["label"]) for p in predictions]
        elif spec.name == "score":
            data = [float(p["score"]) for p in predictions]
        elif spec.name == "probabilities":
            data = [float(p["probabilities"][str(label)]) for p in predictions for label in labels or ()]
        elif spec.name == "embedding":
            data = [float(x) for p in predictions for x in p]
        else:
            data = [p if isinstance(p, str) else json.dumps(p) for p in predictions]
        width = len(data) // n if n else 0
        shape = [n] if len(spec.shape) == 1 else [n, width]
        out.append({"name": spec.name, "datatype": spec.datatype, "shape": shape, "data": data})
    return out


def with_binary_data(request: Any, blob: bytes) -> Any:
    """`request` with the data of its binary inputs (`parameters.binary_data_size`) read from `blob`.

    Raises:
        DapengError: for sizes past the end of the body, or bytes left over.
    """
    offset, inputs = 0, []
    for i, tensor in enumerate(request.inputs):
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            inputs.append(tensor)
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(blob):
            raise DapengError(f"inputs[{i}].parameters.binary_data_size: {size!r} runs past the end of the body")
        inputs.append(tensor.model_copy(update={"data": _decode(blob[offset : offset + size], tensor.datatype, i)}))
        offset += size
    if offset != len(blob):
        raise DapengError(f"{len(blob) - offset} bytes of binary data belong to no input")
    return request.model_copy(update={"inputs": inputs})


def _decode(chunk: bytes, datatype: str, index: int) -> list[Any]:
    """A binary tensor's elements: UINT8 bytes, or BYTES as 4-byte little-endian lengths each followed by its bytes."""
    if datatype == "UINT8":
        return list(chunk)
    if datatype != "BYTES":
        raise DapengError(f"inputs[{index}].datatype: binary {datatype} data is not read", "send UINT8 or BYTES")
    items, at = [], 0
    while at < len(chunk):
        if at + 4 > len(chunk):
            raise DapengError(f"inputs[{index}]: a BYTES element's length is cut off")
        length = int.from_bytes(chunk[at : at + 4], "little")
        if at + 4 + length > len(chunk):
            raise DapengError(f"inputs[{index}]: a BYTES element runs past its binary_data_size")
        items.append(chunk[at + 4 : at + 4 + length])
        at += 4 + length
    return items


def _flatten(data: list[Any]) -> list[Any]:
    """V2 data may be flat or nested row-major: its elements in order."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _product(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
