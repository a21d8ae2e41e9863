"""Export a classifier or tagger to ONNX or a `torch.export` program, checked against PyTorch on real inputs.

```
OUT/
  model.onnx | model.pt2   the graph, with dynamic batch (and sequence) axes
  export.json              format, exporter, opset, inputs/outputs, dynamic axes, max abs difference
  dapeng.json              the Artifact's own (labels, preprocessing), for the same pre/post-processing
  tokenizer.json           text models
  crf.safetensors          a CRF tagger's transition scores (Viterbi decoding runs outside the graph)
```

`dapeng.load(OUT)` runs such a folder with ONNX Runtime (`dapeng.compress.runtime`).

Both formats go through `torch.export` (the ONNX one through `torch.onnx.export(dynamo=True)`).
Neither can trace `pack_padded_sequence` (its lengths live on the CPU and decide shapes), so
recurrent encoders are first rewritten by `exportable(model)` into `UnpackedRecurrent`: the
same weights run over the padded batch, the backward direction over each row reversed within
its own length, which gives the packed outputs exactly (padding comes after a row's last token
going forwards, and stays after it reversed). Every export is then run — by ONNX Runtime, or
by the loaded program — on real encoded items in batches of other sizes and lengths than the
one it was traced with, and refused above `tolerance` (1e-4) max absolute difference.

Recurrent models: `torch.export` decomposes aten.lstm/gru/rnn into a loop unrolled over the
traced length, so their ONNX export uses the TorchScript exporter (`dynamo=False`, ONNX's
LSTM/GRU/RNN ops, dynamic sequence axis), and their `torch.export` program has a static
sequence axis of the task's `max_length` (`export.json`'s `sequence_length`): callers pad
inputs to it, which the masked recurrence ignores.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dapeng.errors import ConfigError, ModelError
from dapeng.layers.recurrent import RecurrentEncoder

__all__ = ["FORMATS", "UnpackedRecurrent", "export", "exportable", "model_inputs"]

FORMATS = ("onnx", "torch")
OPSET = 18
FILES = {"onnx": "model.onnx", "torch": "model.pt2"}
CRF_FILE = "crf.safetensors"
# what a task's capabilities.input feeds the model, in the model's argument order; a tagger with a
# character CNN also reads `char_ids` (B, T, C)
INPUTS = {"text": ("input_ids", "attention_mask"), "tokens": ("input_ids", "attention_mask", "char_ids"),
          "image": ("images",)}
# axis 0 of every input is the batch, axis 1 of token inputs the sequence
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "char_ids")


class UnpackedRecurrent(nn.Module):
    """A `RecurrentEncoder`'s computation without packed sequences (see the module docstring).

    Args:
        encoder: the encoder whose weights (copied, one unidirectional single-layer cell per
            layer and direction) this runs.
    """

    def __init__(self, encoder: RecurrentEncoder) -> None:
        super().__init__()
        rnn = encoder.rnn
        self.kind, self.layers, self.directions = encoder.kind, encoder.layers, encoder.directions
        extra = {"nonlinearity": rnn.nonlinearity} if isinstance(rnn, nn.RNN) else {}
        self.cells = nn.ModuleList()
        for layer in range(self.layers):
            for direction in range(self.directions):
                size = rnn.input_size if layer == 0 else rnn.hidden_size * self.directions
                cell = type(rnn)(size, rnn.hidden_size, batch_first=True, bias=rnn.bias, **extra)
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    if hasattr(rnn, name + suffix):
                        getattr(cell, f"{name}_l0").data.copy_(getattr(rnn, name + suffix).data)
                self.cells.append(cell)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        steps = torch.arange(t, device=x.device)[None]  # (1, T)
        lengths = (mask.long().sum(dim=1) if mask is not None else torch.full((b,), t, device=x.device)).clamp_min(1)
        valid = steps < lengths[:, None]  # (B, T)
        reverse = torch.where(valid, lengths[:, None] - 1 - steps, steps)  # (B, T): its own inverse
        last = (lengths - 1)[:, None, None]  # (B, 1, 1)
        h = x.float()
        finals: list[torch.Tensor] = []
        for layer in range(self.layers):
            outputs, finals = [], []
            for direction in range(self.directions):
                cell = self.cells[layer * self.directions + direction]
                seq = h if direction == 0 else h.gather(1, reverse[..., None].expand_as(h))
                out, _ = cell(seq)  # (B, T, H)
                finals.append(out.gather(1, last.expand(b, 1, out.shape[-1])).squeeze(1))  # (B, H)
                outputs.append(out if direction == 0 else out.gather(1, reverse[..., None].expand_as(out)))
            h = torch.cat(outputs, dim=-1) * valid[..., None]  # (B, T, dirs·H), zeros at padding
        return h, torch.cat(finals, dim=-1)  # (B, T, dirs·H), (B, dirs·H)


def exportable(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode, CPU, fp32) with every `RecurrentEncoder` as an `UnpackedRecurrent`."""
    model = copy.deepcopy(model).cpu().float().eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, RecurrentEncoder):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, UnpackedRecurrent(module))
    return model


def model_inputs(task: Any, items: Sequence[Any], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The model's named inputs for a batch of encoded items, as the task's capabilities declare them.

    Args:
        task: the model's task.
        items: encoded items.
        model: when given, only the inputs its forward takes (a tagger without a character CNN
            ignores `char_ids`).

    Raises:
        ConfigError: a task whose outputs aren't logits of the model's forward (generation, embeddings).
    """
    from dapeng.models import forward_inputs

    caps = task.capabilities
    if caps.output not in ("label", "tags") or caps.input not in INPUTS:
        raise ConfigError(f"export covers classifiers and taggers, not a {caps.input} → {caps.output} task",
                          "export a text/image classifier or a tagger")
    batch = task.collate(list(items))
    names = [name for name in INPUTS[caps.input] if name in batch]
    return forward_inputs(model, batch, names) if model is not None else {name: batch[name] for name in names}


def _dynamic_axes(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    axes = {name: ({0: "batch", 1: "sequence"} if name in SEQUENCE_INPUTS else {0: "batch"}) for name in inputs}
    if "char_ids" in axes:  # (B, T, C): C is the longest word of the batch
        axes["char_ids"][2] = "chars"
    return axes


def _dims(inputs: dict[str, torch.Tensor], max_sequence: int | None) -> tuple[dict[int, Any], ...]:
    """`torch.export` dynamic shapes for the inputs, in order; one `Dim` per axis name, shared by the inputs.

    A model with learned positions takes at most `max_sequence` tokens (its `max_positions`).
    """
    axes = _dynamic_axes(inputs)
    dims = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence", max=max_sequence),
            "chars": torch.export.Dim("chars")}
    return tuple({axis: dims[label] for axis, label in axes[name].items()} for name in inputs)


def _batches(task: Any, items: Sequence[Any], model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """The trace batch (up to 4 items) and check batches of other sizes: up to 32 items, and a single one."""
    if len(items) < 2:
        raise ConfigError(f"export needs at least 2 real inputs to check against, got {len(items)}",
                          "pass a run whose eval or test split has data")
    trace = list(items[:4]) if len(items) > 4 else list(items[:2])
    checks = [list(items[len(trace):len(trace) + 32]) or list(items), [items[-1]]]
    return [model_inputs(task, b, model) for b in (trace, *checks)]


def _recurrent(model: nn.Module) -> bool:
    return any(isinstance(m, UnpackedRecurrent) for m in model.modules())


def _onnx(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    import onnx

    args = {"input_names": list(inputs), "output_names": ["logits"], "opset_version": OPSET, "verbose": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _recurrent(model):
            # torch.export decomposes aten.lstm/gru/rnn into a loop unrolled over the traced length,
            # fixing the sequence axis; the TorchScript exporter maps them to ONNX's LSTM/GRU/RNN ops
            torch.onnx.export(model, tuple(inputs.values()), str(path), dynamic_axes=_dynamic_axes(inputs),
                              dynamo=False, **args)
            exporter = "torch.onnx.export(dynamo=False)"
        else:
            program = torch.onnx.export(model, tuple(inputs.values()), dynamic_shapes=_dims(inputs, getattr(model, "max_positions", None)), dynamo=True,
                                        **args)
            program.save(str(path))
            exporter = "torch.onnx.export(dynamo=True)"
    proto = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"exporter": exporter, "opset": opset}


def _onnx_runner(path: Path) -> Any:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def _torch(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    dims = _dims(inputs, getattr(model, "max_positions", None))
    if _recurrent(model):
        dims = tuple({axis: dim for axis, dim in spec.items() if axis != 1} for spec in dims)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.RNN re-assigns its _flat_weights while traced: harmless
        program = torch.export.export(model, tuple(inputs.values()), dynamic_shapes=dims)
    torch.export.save(program, str(path))
    return {"exporter": "torch.export.export"}


def _static_length(task: Any) -> int:
    """The sequence length a recurrent program is traced at: the task's `max_length` (what it truncates to)."""
    length = getattr(getattr(task, "options", None), "max_length", None)
    if not isinstance(length, int):
        raise ConfigError("torch.export fixes a recurrent model's sequence length (it unrolls aten.lstm/gru/rnn), "
                          "and this task has no max_length to fix it at", "export recurrent models with --format onnx")
    return length


def _pad_to(inputs: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Right-pad the token inputs' sequence axis (1) to `length` (masked positions: a recurrent model's outputs ignore them)."""
    def pad(v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, length - v.shape[1]))

    return {k: pad(v) if k in SEQUENCE_INPUTS else v for k, v in inputs.items()}


def _torch_runner(path: Path) -> Any:
    module = torch.export.load(str(path)).module()
    return lambda inputs: module(*inputs.values()).detach().numpy()


def export(model: nn.Module, task: Any, items: Sequence[Any], out: str | Path, fmt: str = "onnx", *,
           artifact_dir: str | Path | None = None, tolerance: float = 1e-4) -> dict[str, Any]:
    """Export `model` and check it against its PyTorch outputs on real encoded `items`.

    Args:
        model: a float classifier or tagger.
        task: its task (encodes the inputs; its capabilities name them).
        items: encoded real inputs (e.g. the eval split), at least 2; up to 37 are used.
        out: the folder to write (module docstring); replaced only once the check passes.
        fmt: `onnx` or `torch`.
        artifact_dir: the Artifact the model came from: its dapeng.json and tokenizer.json are copied.
        tolerance: the largest max absolute difference of the logits accepted.

    Returns:
        The report written to export.json.

    Raises:
        ModelError: the exported graph's outputs differ from PyTorch's by more than `tolerance`.
    """
    from dapeng.hub.artifact import META, TOKENIZER

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    reference = model.cpu().float().eval()
    batches = _batches(task, items, reference)
    graph = exportable(reference)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        path = tmp / FILES[fmt]
        # a recurrent program's sequence axis is static: it reads inputs padded to the task's max_length
        length = _static_length(task) if fmt == "torch" and _recurrent(graph) else None
        fed = [_pad_to(b, length) for b in batches] if length else batches
        with torch.no_grad():
            facts = (_onnx if fmt == "onnx" else _torch)(graph, fed[0], path)
        run = _onnx_runner(path) if fmt == "onnx" else _torch_runner(path)
        diffs = []
        with torch.no_grad():
            for inputs, padded in zip(batches[1:], fed[1:]):
                expected = reference(*inputs.values()).numpy()
                diffs.append(float(np.abs(run(padded) - expected).max()))
        report = {
            "format": fmt, "file": FILES[fmt], **facts, "torch": torch.__version__,
            "inputs": {name: {"dtype": str(t.dtype).removeprefix("torch."), "dims": len(t.shape)}
                       for name, t in batches[0].items()},
            "outputs": ["logits"],
            "dynamic_axes": {k: {a: n for a, n in v.items() if not (length and a == 1)}
                             for k, v in _dynamic_axes(batches[0]).items()},
            "sequence_length": length,
            "checked": {"batches": [int(next(iter(b.values())).shape[0]) for b in batches[1:]],
                        "max_abs_diff": max(diffs), "tolerance": tolerance},
        }
        if fmt == "onnx":
            import onnxruntime

            report["onnxruntime"] = onnxruntime.__version__
        if max(diffs) > tolerance:
            raise ModelError(f"the {fmt} export differs from PyTorch by {max(diffs):.2e} (max abs) on real inputs, "
                             f"above the tolerance {tolerance:.0e}", "nothing written; report it with the model name")
        crf = getattr(reference, "crf", None)
        if crf is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in crf.state_dict().items()}, str(tmp / CRF_FILE))
            report["crf"] = {"file": CRF_FILE, "num_tags": int(crf.num_tags)}
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        if artifact_dir is not None:
            for name in (META, TOKENIZER):
                if (Path(artifact_dir) / name).is_file():
                    shutil.copy2(Path(artifact_dir) / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
