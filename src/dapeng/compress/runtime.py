"""ONNX Runtime as a backend: an exported graph behind a model's forward, and int8 quantization of the graph.

`dapeng export RUN --format onnx` writes a folder (see `dapeng.compress.export`) that holds the
graph and the Artifact's task files. `load_export(folder)` turns it back into a model and a task
for the Pipeline: the task encodes and decodes exactly as for the PyTorch model, and
`OnnxRuntimeModel.forward` feeds the graph the batch tensors it was traced with. A CRF tagger's
Viterbi decoding runs outside the graph, over the transition scores saved beside it.

`quantize_export(folder, method, ...)` quantizes such a graph with ONNX Runtime's own int8
quantizer (dynamic: int8 weights, activations quantized per batch; static: activation scales
calibrated on training items) behind the same accuracy gate as `dapeng quantize`.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dapeng.errors import CheckpointError, ConfigError, DapengError

__all__ = ["BACKENDS", "ORT_METHODS", "OnnxRuntimeModel", "find_export", "load_export", "quantize_export"]

BACKENDS = ("torch", "onnxruntime")
ORT_METHODS = ("int8-dynamic", "int8-static")
EXPORT_FILE = "export.json"
GRAPH_FILE = "model.onnx"


class OnnxRuntimeModel(nn.Module):
    """An ONNX graph run by ONNX Runtime, called like the PyTorch model it was exported from.

    The session is made on the first call, with as many intra-op threads as torch has then
    (the server sets its thread count after loading its models).

    Args:
        path: the `model.onnx` file.
        inputs: the graph's input names, in order (export.json's `inputs`).
        crf: a CRF tagger's transition scores (decoding runs in PyTorch over the graph's emissions).
    """

    backend = "onnxruntime"

    def __init__(self, path: Path, inputs: Sequence[str], crf: nn.Module | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.inputs = tuple(inputs)
        self.crf = crf
        self._session: Any = None
        self._lock = threading.Lock()

    def session(self) -> Any:
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads = torch.get_num_threads()
                options.inter_op_num_threads = 1
                self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            return self._session

    def forward(self, *args: torch.Tensor, **batch: torch.Tensor) -> torch.Tensor:
        """The graph's first output (logits or emissions) for the batch tensors it reads.

        Positional tensors are its inputs in order, as for the model it came from.
        """
        batch = {**dict(zip(self.inputs, args)), **batch}
        missing = [name for name in self.inputs if name not in batch]
        if missing:
            raise DapengError(f"the ONNX graph {self.path} needs inputs {missing} that the batch lacks",
                              "export the model again with this version of dapeng")
        feeds = {name: batch[name].detach().cpu().numpy() for name in self.inputs}
        return torch.from_numpy(self.session().run(None, feeds)[0])

    def extra_repr(self) -> str:
        return f"{self.path}, inputs={list(self.inputs)}"


def find_export(path: str | Path) -> Path | None:
    """The ONNX export folder `path` is, or the `export-onnx` one of the run directory it is; else None."""
    path = Path(path)
    for folder in (path, path / "export-onnx", path.parent / "export-onnx"):
        if (folder / EXPORT_FILE).is_file() and (folder / GRAPH_FILE).is_file():
            return folder
    return None


def _report(folder: Path) -> dict[str, Any]:
    try:
        report = json.loads((folder / EXPORT_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / EXPORT_FILE} is unreadable ({type(err).__name__})",
                              "export the model again: dapeng export RUN --format onnx") from None
    if report.get("format") != "onnx":
        raise CheckpointError(f"{folder} holds a {report.get('format')!r} export, not an ONNX graph",
                              "export it with --format onnx for the onnxruntime backend")
    return report


def load_export(path: str | Path) -> tuple[OnnxRuntimeModel, Any, dict[str, Any]]:
    """The model, task and `dapeng.json` of an ONNX export folder (or of a run with one in `export-onnx/`).

    Raises:
        CheckpointError: no ONNX export there, or one without the Artifact's dapeng.json.
    """
    from dapeng.hub.artifact import META, read_meta, task_state_of
    from dapeng.tasks import TASKS

    folder = find_export(path)
    if folder is None:
        raise CheckpointError(f"{path} holds no ONNX export ({EXPORT_FILE} + {GRAPH_FILE})",
                              f"write one first: dapeng export {path} --format onnx")
    report = _report(folder)
    if not (folder / META).is_file():
        raise CheckpointError(f"the ONNX export {folder} has no {META}, so its task is unknown",
                              "export it again from a run directory (dapeng export RUN --format onnx)")
    meta = read_meta(folder, weights=False)
    task_cls = TASKS.get(meta["task"])
    state = task_state_of(folder, meta)
    task = task_cls.from_state(state) if hasattr(task_cls, "from_state") else task_cls()
    crf = None
    if report.get("crf"):
        from safetensors.torch import load_file

        from dapeng.layers.crf import CRF

        crf = CRF(int(report["crf"]["num_tags"]))
        try:
            crf.load_state_dict(load_file(str(folder / report["crf"]["file"])))
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{folder / report['crf']['file']} is corrupt ({type(err).__name__})",
                                  "export the model again") from None
    model = OnnxRuntimeModel(folder / GRAPH_FILE, list(report["inputs"]), crf=crf).eval()
    return model, task, {**meta, "export": report}


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over encoded training items, in batches."""

    def __init__(self, task: Any, items: Sequence[Any], names: Sequence[str], batch_size: int = 16) -> None:
        from dapeng.compress.export import model_inputs

        self._batches = iter([
            {name: value.numpy() for name, value in model_inputs(task, items[i:i + batch_size]).items() if name in names}
            for i in range(0, len(items), batch_size)
        ])

    def get_next(self) -> dict[str, Any] | None:
        return next(self._batches, None)


def quantize_export(
    source: str | Path,
    method: str,
    eval_items: Sequence[Any],
    out: str | Path,
    *,
    calibration: Sequence[Any] = (),
    max_drop: float = 0.5,
    metric: str = "accuracy",
) -> dict[str, Any]:
    """Quantize an ONNX export with ONNX Runtime, measure it against the float graph, save it if it passes.

    Args:
        source: an ONNX export folder (or a run directory with `export-onnx/`).
        method: `int8-dynamic` (int8 weights, activation scales per batch) or `int8-static`
            (QDQ with activation scales calibrated on `calibration`).
        eval_items: encoded items with labels for the before/after metric.
        out: the export folder to write (loadable with `dapeng.load`).
        calibration: encoded training items (`int8-static`).
        max_drop: the largest drop of `metric` allowed, in points.
        metric: the task metric the gate reads.

    Returns:
        `{"method", "backend", "before", "after", "drop", "size_mb": {"before", "after"}, "model"}`.

    Raises:
        DapengError: the quantized graph loses more than `max_drop` points (nothing is written).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from dapeng.compress.quantize import evaluate_model

    if method not in ORT_METHODS:
        raise ConfigError(f"the onnxruntime backend has no {method!r} quantization", f"choose one of {', '.join(ORT_METHODS)}")
    model, task, meta = load_export(source)
    if meta["export"].get("quantization"):
        raise ConfigError(f"{model.path.parent} is already quantized", "quantize its float export instead")
    if method == "int8-static" and not len(calibration):
        raise ConfigError("int8-static needs calibration samples", "pass --calibration N (training items, e.g. 256)")
    before = evaluate_model(model, task, eval_items)
    if metric not in before:
        raise ConfigError(f"the task reports no {metric!r} metric", f"its metrics: {', '.join(before)}")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.quantize")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model.path.parent, tmp)
    try:
        graph = tmp / GRAPH_FILE
        if method == "int8-dynamic":
            quantize_dynamic(str(model.path), str(graph), weight_type=QuantType.QInt8)
        else:
            reader = _Calibration(task, list(calibration), model.inputs)
            quantize_static(str(model.path), str(graph), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        quantized = OnnxRuntimeModel(graph, model.inputs, crf=model.crf).eval()
        after = evaluate_model(quantized, task, eval_items)
        drop = 100.0 * (before[metric] - after[metric])
        if drop > max_drop:
            raise DapengError(
                f"onnxruntime {method} loses {drop:.2f} points of {metric} ({100 * before[metric]:.2f} → "
                f"{100 * after[metric]:.2f}), more than --max-drop {max_drop}; nothing written",
                "try int8-dynamic, more --calibration samples, or a larger --max-drop",
            )
        import onnxruntime

        report = {**meta["export"], "quantization": {
            "method": method, "backend": "onnxruntime", "onnxruntime": onnxruntime.__version__,
            "parent": str(model.path.parent), "calibration": len(calibration) if method == "int8-static" else 0,
            "metric": {"name": metric, "before": before[metric], "after": after[metric], "items": len(eval_items)},
        }}
        (tmp / EXPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"method": method, "backend": "onnxruntime", "before": before[metric], "after": after[metric],
            "drop": drop, "size_mb": {"before": model.path.stat().st_size / 1e6,
                                      "after": (out / GRAPH_FILE).stat().st_size / 1e6},
            "model": str(out)}
