"""The Artifact: a self-describing model folder that `dapeng.load` reads and every command writes.

```
model/
  model.safetensors   weights
  dapeng.json         {"format": 1, "dapeng": VERSION, "task": ..., "model": {"name": ..., "kwargs": {...}},
                       "labels": [...], "preprocess": {...}, "quantization": null|{...}, "parent": null|...,
                       "metrics": {...}, "precision": "fp32"|"bf16"|null}
  tokenizer.json      text models only
  card.md             model card: data, license, metrics, intended use, limits
```

`save_artifact` writes everything into a temp folder next to the target and renames it
into place; `load_artifact` checks every file and that the weights fit the model the
config builds, and turns each failure into a one-line `CheckpointError` or `ModelError`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapeng.errors import CheckpointError, ModelError

FORMAT = 1
WEIGHTS = "model.safetensors"
META = "dapeng.json"
TOKENIZER = "tokenizer.json"
CARD = "card.md"

__all__ = ["Artifact", "attach_encoder", "load_artifact", "read_meta", "render_card", "save_artifact",
           "sentence_encoder", "trained_precision"]


@dataclass
class Artifact:
    """A loaded Artifact: the model (eval mode), its task (rebuilt with `from_state`), `dapeng.json` and the folder."""

    model: Any
    task: Any
    meta: dict[str, Any]
    path: Path


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (tuples → lists, paths → strings), so dapeng.json round-trips."""
    return json.loads(json.dumps(value, default=str))


def save_artifact(
    path: str | Path,
    *,
    model: Any,
    model_name: str,
    model_kwargs: dict[str, Any],
    task_name: str,
    task_state: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    card: str | dict[str, Any] | None = None,
    parent: Any = None,
    quantization: dict[str, Any] | None = None,
    precision: str | None = None,
) -> Path:
    """Write `model` and everything needed to rebuild it as an Artifact folder at `path`.

    Args:
        path: the Artifact folder to create (replaced atomically if it exists).
        model: the trained `nn.Module`.
        model_name: its `MODELS` name.
        model_kwargs: the constructor arguments that rebuild it.
        task_name: its `TASKS` name.
        task_state: `task.state()`: "labels" and "tokenizer" (a JSON string) are split out,
            the rest becomes "preprocess".
        metrics: final metrics, recorded in dapeng.json and the card.
        card: the model card text, or a dict with `data`, `license`, `intended_use`,
            `limits`, `summary` to render one.
        parent: where it came from (an init model, a source package), recorded as is.
        quantization: the quantization spec of a quantized model.
        precision: the precision the model was trained and evaluated in (`fp32`, `bf16`):
            loading it later defaults to the same, so its predictions match its reported metrics.

    Returns:
        The Artifact folder.
    """
    from safetensors.torch import save_model

    from dapeng import __version__

    path = Path(path)
    state = dict(task_state)
    labels = state.pop("labels", None)
    tokenizer = state.pop("tokenizer", None)
    meta = {
        "format": FORMAT,
        "dapeng": __version__,
        "task": task_name,
        "model": {"name": model_name, "kwargs": _jsonable(model_kwargs)},
        "labels": _jsonable(labels),
        "preprocess": _jsonable(state),
        "quantization": _jsonable(quantization),
        "parent": _jsonable(parent),
        "metrics": _jsonable(metrics or {}),
        "precision": precision,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        # save_model (not save_file) de-duplicates tied weights, e.g. a shared embedding/LM head.
        save_model(model, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            (tmp / TOKENIZER).write_text(tokenizer if isinstance(tokenizer, str) else json.dumps(tokenizer))
        text = card if isinstance(card, str) else render_card(meta, **(card or {}))
        (tmp / CARD).write_text(text)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def render_card(
    meta: dict[str, Any],
    *,
    summary: str | None = None,
    data: str | None = None,
    license: str | None = None,
    intended_use: str | None = None,
    limits: str | None = None,
) -> str:
    """A Markdown model card from dapeng.json plus what the caller knows about data and use."""
    model = meta.get("model", {})
    labels = meta.get("labels")
    metrics = meta.get("metrics") or {}
    lines = [
        f"# {model.get('name', 'model')} for {meta.get('task', 'a task')}",
        "",
        summary or f"A `{model.get('name')}` model trained with dapeng {meta.get('dapeng', '')} for `{meta.get('task')}`.",
        "",
        "## Data",
        "",
        data or "Not recorded.",
        "",
        "## License",
        "",
        license or "Not recorded: check the license of the training data before redistributing.",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| split | metric | value |", "|---|---|---|"]
        for split, values in metrics.items():
            if isinstance(values, dict):
                lines += [f"| {split} | {k} | {_fmt(v)} |" for k, v in values.items()]
            else:
                lines.append(f"| - | {split} | {_fmt(values)} |")
    else:
        lines.append("None recorded.")
    lines += [
        "",
        "## Intended use",
        "",
        intended_use or f"{meta.get('task')} on inputs like the training data"
        + (f"; labels: {', '.join(map(str, labels[:20]))}{' …' if len(labels) > 20 else ''}." if labels else "."),
        "",
        "## Limits",
        "",
        limits or "Measured only on the splits above; expect lower quality on inputs unlike the training data. "
        "Not evaluated for fairness or safety-critical use.",
        "",
        "## Model",
        "",
        f"`{model.get('name')}` with arguments `{json.dumps(model.get('kwargs', {}))}`; "
        f"quantization: {json.dumps(meta.get('quantization'))}; parent: {json.dumps(meta.get('parent'))}.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def read_meta(path: str | Path, weights: bool = True) -> dict[str, Any]:
    """Read and check an Artifact's dapeng.json.

    Args:
        path: the Artifact folder.
        weights: whether the folder must hold model.safetensors too (an ONNX export holds a graph instead).

    Raises:
        CheckpointError: the folder, dapeng.json or the weights file is missing, or the JSON is bad.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"artifact folder {str(path)!r} not found", "pass a folder written by dapeng")
    for name in (META, WEIGHTS) if weights else (META,):
        if not (path / name).is_file():
            raise CheckpointError(f"artifact {str(path)!r} is missing {name}", "re-export or re-train the model")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"artifact {str(path)!r}: {META} is not valid JSON", "re-export the model") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"artifact {str(path)!r}: unknown {META} format", f"expected format {FORMAT}")
    for key in ("task", "model"):
        if key not in meta:
            raise CheckpointError(f"artifact {str(path)!r}: {META} lacks {key!r}", "re-export the model")
    return meta


def task_state_of(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The `task.state()` dict an Artifact was saved from (inverse of the split in `save_artifact`)."""
    state = {**(meta.get("preprocess") or {}), "labels": meta.get("labels")}
    if (path / TOKENIZER).is_file():
        state["tokenizer"] = (path / TOKENIZER).read_text()
    return state


def load_artifact(path: str | Path, precision: str = "fp32") -> Artifact:
    """Rebuild the model and task of an Artifact folder.

    Args:
        path: the Artifact folder.
        precision: `fp32`, `bf16` (weights cast to bfloat16) or `auto` (bf16 where the
            hardware runs it natively).

    Raises:
        CheckpointError: missing files, bad dapeng.json or corrupt safetensors.
        ModelError: weights that don't fit the model dapeng.json describes.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    if precision not in ("fp32", "bf16", "auto"):
        raise ModelError(f"precision {precision!r} is not one of fp32, bf16, auto")
    path = Path(path)
    meta = read_meta(path)
    task_cls = TASKS.get(meta["task"])
    state = task_state_of(path, meta)
    task = task_cls.from_state(state) if hasattr(task_cls, "from_state") else task_cls()
    attach_encoder(task)
    spec = meta["model"]
    try:
        model = MODELS.create(spec["name"], **spec.get("kwargs", {}))
    except TypeError as err:
        raise ModelError(f"artifact {str(path)!r}: model {spec['name']!r} rejects its arguments: {err}") from None
    quantization = meta.get("quantization")
    if quantization:
        model = _prepare_quantized(model, quantization, path)
    try:
        weights = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"artifact {str(path)!r}: {WEIGHTS} is corrupt or truncated ({type(err).__name__})",
            "re-export or re-train the model",
        ) from None
    _load_weights(model, weights, path)
    if precision == "auto":
        from dapeng._hardware import native_bf16

        precision = "bf16" if native_bf16("cpu") else "fp32"
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.eval()
    return Artifact(model=model, task=task, meta=meta, path=path)


def sentence_encoder(name_or_path: str) -> Callable[[Sequence[str]], Any]:
    """Texts → (n, dim) embeddings with an Artifact that can `embed` (a hub name, an Artifact folder or a run).

    Raises:
        NotFoundError: an unknown hub name.
        UnsupportedError: a model whose task does not embed.
    """
    import torch

    from dapeng.tasks.base import capabilities_of

    path = Path(name_or_path)
    if path.is_dir():
        folder = path if (path / META).is_file() else path / "model"
    else:
        from dapeng.hub.store import resolve

        folder = resolve(name_or_path)
    encoder = load_artifact(folder, precision="fp32")
    capabilities_of(encoder.task).require("embed", str(name_or_path), str(encoder.meta.get("task", "")))

    def embed(texts: Sequence[str]) -> Any:
        with torch.inference_mode():
            return encoder.task.embed(encoder.model, list(texts))

    return embed


def attach_encoder(task: Any) -> None:
    """Give a task that embeds its inputs with another model (`task.encoder_name`) that model's `embed`."""
    name = getattr(task, "encoder_name", None)
    if name:
        task.use_encoder(sentence_encoder(name))


def trained_precision(meta: dict[str, Any]) -> str:
    """The precision an Artifact was trained in (`dapeng.json`), or `auto` when it doesn't say."""
    recorded = meta.get("precision")
    return recorded if recorded in ("fp32", "bf16") else "auto"


def _prepare_quantized(model: Any, spec: dict[str, Any], path: Path) -> Any:
    """Swap in quantized layers before loading quantized weights.

    Quantized layers are layers (`dapeng.layers.quantized`), so the hub rebuilds them without
    importing the compress package above it.
    """
    from dapeng.layers.quantized import prepare_quantized

    try:
        return prepare_quantized(model, spec)
    except ValueError as err:
        raise ModelError(f"artifact {str(path)!r} is quantized in a way this dapeng can't rebuild: {err}",
                         "load the unquantized parent model instead") from None


def _load_weights(model: Any, weights: dict[str, Any], path: Path) -> None:
    """Load `weights` strictly; tied weights saved once by `save_model` are filled from their twin."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    # save_model drops all but one name of tied tensors: fill the others from the tensor they share.
    if missing:
        by_ptr: dict[int, str] = {}
        for name, tensor in expected.items():
            if name in weights:
                by_ptr.setdefault(tensor.data_ptr(), name)
        for name in list(missing):
            twin = by_ptr.get(expected[name].data_ptr())
            if twin is not None:
                weights[name] = weights[twin]
                missing.remove(name)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''}")
        raise ModelError(f"artifact {str(path)!r}: weights don't match the model config ({'; '.join(parts)})",
                         "the weights file and dapeng.json come from different models")
    for name, tensor in expected.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise ModelError(
                f"artifact {str(path)!r}: weight {name} has shape {tuple(weights[name].shape)}, "
                f"the model config needs {tuple(tensor.shape)}",
                "the weights file and dapeng.json come from different models",
            )
    model.load_state_dict(weights, strict=True)
