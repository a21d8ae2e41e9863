"""The contract between data, model and training loop.

The one path data takes (DESIGN.md):

    records ─► Task.setup / Task.encode ─► Task.collate ─► Model ─► Task.loss ─► Trainer

* A *record* is a plain dict straight from a reader or the dataset catalog, e.g.
  `{"text": "a fine film", "label": "fresh"}` or `{"image": uint8 array (H, W[, C]), "label": 3}`
  or `{"tokens": [...], "tags": [...]}`.
* `setup` learns what the task needs from the training records (label set, tokenizer,
  normalisation statistics) so that `model_kwargs` can tell the model builder the sizes
  that depend on the data (`num_labels`, `vocab_size`, `in_channels`, ...).
* `encode` turns records into *items* (dicts of tensors, cached once); `collate` pads a
  list of items into a *batch* (dict of tensors, padded per batch).
* `loss(model, batch)` runs the model and returns the scalar loss and its outputs; the
  Trainer never looks inside. `metric()` returns a fresh accumulator for evaluation.
* `state()` is everything needed to rebuild the task for inference (labels, tokenizer
  path, preprocessing); it goes into the Artifact's `dapeng.json` ("labels", "preprocess").
* `capabilities` (a class attribute) declares what the task does at inference: the field raw
  inputs go into, what `predict` returns, which verbs and explanation methods it supports.
  The Pipeline, the CLI, the server's routes and OpenAPI schemas and the explainers read it;
  none of them guesses from a task's name or an output's shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from dapeng.errors import DapengError
from dapeng.records import Batch, Item, Record

__all__ = ["Batch", "Capabilities", "Item", "Metric", "Record", "Task", "UnsupportedError", "capabilities_of"]


VERBS = ("predict", "generate", "embed", "explain")
INPUTS = ("text", "image", "tokens", "question", "image+text")
OUTPUTS = ("label", "tags", "vector", "text", "span", "score")
# The record fields one raw input fills, for input kinds that take more than their own field.
INPUT_FIELDS = {"question": ("question", "context"), "image+text": ("image", "text")}


class UnsupportedError(DapengError):
    """A verb, explanation method or input the model's task does not support (HTTP 400 / exit 2)."""


@dataclass(frozen=True)
class Capabilities:
    """What a task does at inference, declared once and read by every caller.

    Args:
        input: the record field raw inputs go into: "text" (a string), "image" (pixels, a
            file, base64) or "tokens" (a list of words, or a sentence split into words with their
            character offsets, `dapeng.data.tokenizers.split_words`), "question" (a record
            `{"question", "context"}`: `fields` lists the strings one input holds) or "image+text"
            (an object with both, `{"image": ..., "text": "..."}`: a question about an image).
        output: what `predict` gives per input: "label" (`{"label", "score", "probabilities"}`),
            "tags" (`{"tokens", "tags", ...}`), "vector" (an embedding), "text" (generation),
            "span" (`{"answer", "score", "start", "end"}`: a piece of the input's context) or
            "score" (`{"score"}`: how well an image+text pair matches).
        verbs: which of `VERBS` the task supports.
        explain: the explanation methods (`dapeng.explain.METHODS`) it supports.
        batching: whether `predict` requests may be batched together by the server.
        output_schema: JSON schema of one `predict` output (the server's OpenAPI document).
    """

    input: str
    output: str
    verbs: frozenset[str]
    explain: tuple[str, ...] = ()
    batching: bool = True
    output_schema: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.verbs) - set(VERBS)
        if self.input not in INPUTS or self.output not in OUTPUTS or unknown:
            raise ValueError(f"bad capabilities: input={self.input!r} output={self.output!r} verbs={sorted(unknown)}")
        if self.explain and "explain" not in self.verbs:
            raise ValueError("explanation methods declared without the explain verb")

    @property
    def fields(self) -> tuple[str, ...]:
        """The record fields one raw input fills: `(input,)`, or e.g. ("question", "context")."""
        return INPUT_FIELDS.get(self.input, (self.input,))

    def supports(self, verb: str) -> bool:
        return verb in self.verbs

    def require(self, verb: str, model: str, task: str) -> None:
        """Raise UnsupportedError naming what the model can do, unless it supports `verb`."""
        if verb not in self.verbs:
            raise UnsupportedError(f"model {model!r} (task {task!r}) can't {verb}",
                                   f"it supports: {', '.join(v for v in VERBS if v in self.verbs)}")

    def require_method(self, method: str, model: str, task: str) -> None:
        self.require("explain", model, task)
        if method not in self.explain:
            raise UnsupportedError(f"model {model!r} (task {task!r}) has no {method!r} explanations",
                                   f"choose one of: {', '.join(self.explain)}")

    def input_schema(self) -> dict[str, Any]:
        """JSON schema of one raw input."""
        if self.input == "image":
            return IMAGE_INPUT
        if self.input == "image+text":
            return {"type": "object", "properties": {"image": IMAGE_INPUT, "text": {"type": "string"}},
                    "required": ["image", "text"]}
        if len(self.fields) > 1:
            return {"type": "object", "properties": {f: {"type": "string"} for f in self.fields},
                    "required": list(self.fields)}
        if self.input == "tokens":
            return {"anyOf": [{"type": "string", "description": "a sentence, split into words"},
                              {"type": "array", "items": {"type": "string"}}]}
        return {"type": "string"}

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "fields": list(self.fields), "output": self.output, "verbs": [v for v in VERBS if v in self.verbs],
                "explain": list(self.explain), "batching": self.batching}


IMAGE_INPUT = {"anyOf": [{"type": "object", "properties": {"b64": {"type": "string"}}, "required": ["b64"]},
                         {"type": "array", "description": "pixel values 0..255, (H, W) or (H, W, C)"}]}
LABEL_OUTPUT = {
    "type": "object",
    "properties": {"label": {"type": "string"}, "score": {"type": "number"},
                   "probabilities": {"type": "object", "additionalProperties": {"type": "number"}}},
    "required": ["label", "score"],
}
VECTOR_OUTPUT = {"type": "array", "items": {"type": "number"}}


def capabilities_of(task: Any) -> Capabilities:
    """The task's declared capabilities; a task object without a declaration is a programming error."""
    caps = getattr(task, "capabilities", None)
    if not isinstance(caps, Capabilities):
        raise TypeError(f"task {getattr(task, 'name', task)!r} declares no `capabilities` (dapeng.tasks.base)")
    return caps


@runtime_checkable
class Metric(Protocol):
    """Accumulates predictions over an evaluation pass."""

    def update(self, outputs: dict[str, torch.Tensor], batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]:
        """Scalar metrics by name, e.g. {"accuracy": 0.93, "macro_f1": 0.92}."""
        ...


@runtime_checkable
class Task(Protocol):
    """What every task in `TASKS` provides. See the module docstring for the data path."""

    name: str
    capabilities: Capabilities

    def setup(self, train: Sequence[Record]) -> None: ...

    def model_kwargs(self) -> dict[str, Any]: ...

    def encode(self, records: Sequence[Record]) -> list[Item]: ...

    def collate(self, items: list[Item]) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def metric(self) -> Metric: ...

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[Any]: ...

    def state(self) -> dict[str, Any]: ...
