"""Visual question answering: an answer per (image, question) pair, one class per answer.

Records are `{"image": uint8 array (H, W[, C]), "text": the question, "label": the answer}`,
optionally with a `"type"` (easy-VQA: "yes/no", "shape", "color") that the metric breaks accuracy
down by; no label at predict time. `setup` learns the answer set, a word tokenizer for the
questions (`tasks/_words.py` options: GloVe vectors via `init_model`) and the images' channels,
size and per-channel statistics. Items keep the image as uint8 and the question as ids; `collate`
normalises the images and pads the questions per batch. The model is `vqa` (models/vqa.py).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from dapeng.errors import DataError
from dapeng.records import Record
from dapeng.tasks._classification import (
    ClassificationMetric,
    ClassificationTask,
    Options,
    label_list,
    parse_options,
)
from dapeng.tasks._classification import where as record_where
from dapeng.tasks._words import WordOptions, glove_init
from dapeng.tasks.base import LABEL_OUTPUT, Capabilities
from dapeng.tasks.image_classification import channel_stats, image_geometry, image_tensor


class VQAOptions(WordOptions, Options):
    """`task_options` of visual-question-answering."""

    tokenizer: Literal["wordpiece", "bpe", "word"] = "word"
    max_length: int = Field(32, gt=2, description="question tokens kept")
    image_size: int | None = Field(None, gt=0, description="resize to this square size (default: the training size)")
    channels_last: bool = Field(True, description="NHWC image batches: faster convolutions")


class VQAMetric(ClassificationMetric):
    """Accuracy and macro-F1 over answers, and accuracy per question type (`accuracy_<type>`)."""

    def __init__(self, labels: Sequence[str]) -> None:
        super().__init__(labels)
        self.by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # type -> [correct, total]

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        super().update(outputs, batch)
        types = batch.get("types")
        if not types:
            return
        right = (outputs["logits"].detach().argmax(-1) == batch["labels"]).cpu().tolist()
        for kind, ok in zip(types, right):
            counts = self.by_type[kind]
            counts[0] += int(ok)
            counts[1] += 1

    def compute(self) -> dict[str, float]:
        out = super().compute()
        for kind, (correct, total) in sorted(self.by_type.items()):
            # "yes/no" -> accuracy_yes_no: metric names hold no slashes (they nest in logs and TensorBoard)
            out["accuracy_" + re.sub(r"\W+", "_", kind)] = correct / max(total, 1)
        return out


class VQATask(ClassificationTask):
    """Image and question in, one answer out. Options: see `VQAOptions` (all keyword arguments)."""

    name = "visual-question-answering"
    capabilities = Capabilities(
        input="image+text", output="label", verbs=frozenset({"predict", "explain"}), explain=("gradcam",),
        output_schema=LABEL_OUTPUT,
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(parse_options(VQAOptions, self.name, options))
        self.options: VQAOptions
        self.tokenizer: Any = None
        self.pad_id = 0
        self.in_channels = 0
        self.image_size = 0
        self.mean: list[float] = []
        self.std: list[float] = []

    # -- setup ----------------------------------------------------------------------------

    def setup(self, train: Sequence[Record]) -> None:
        from dapeng.data.tokenizers import load_tokenizer, train_tokenizer

        self.set_labels(label_list(train), train)
        opts = self.options
        if opts.tokenizer_path:
            self.tokenizer = load_tokenizer(opts.tokenizer_path)
        else:
            questions = [self._question(r, i) for i, r in enumerate(train)]
            self.tokenizer = train_tokenizer(questions, opts.tokenizer, opts.vocab_size, opts.lowercase,
                                             opts.min_frequency)
            if opts.glove_vocab:
                from dapeng.data.glove import frequent_words
                from dapeng.data.tokenizers import extend_word_vocab

                extend_word_vocab(self.tokenizer, frequent_words(opts.glove_vocab))
        self._finish_tokenizer()
        self.in_channels, self.image_size = image_geometry(train, opts.image_size)
        # one image per distinct array: easy-VQA's records share their image with ~10 questions
        distinct = list({id(r["image"]): r for r in train[:50000]}.values())[:20000]
        self.mean, self.std = channel_stats(torch.stack([self._image(r, i) for i, r in enumerate(distinct)]))

    def _finish_tokenizer(self) -> None:
        from dapeng.data.tokenizers import PAD, special_id

        self.tokenizer.no_padding()  # padding is collate's (text_classification.py says why)
        self.pad_id = special_id(self.tokenizer, PAD, fallback=0)

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": self.tokenizer.get_vocab_size(), "num_labels": len(self.labels), "pad_id": self.pad_id,
                "in_channels": self.in_channels, "image_size": self.image_size}

    def init_model(self, model: nn.Module) -> None:
        """Copy GloVe vectors into the question embeddings (when `glove: true`); the runner calls this."""
        if self.options.glove:
            self.glove_coverage = glove_init(model, self.tokenizer, self.options.freeze_embeddings)

    # -- records → tensors ----------------------------------------------------------------

    def _question(self, record: Record, i: int) -> str:
        text = record.get("text")
        if not isinstance(text, str):
            found = ", ".join(k for k in record if not k.startswith("_"))
            raise DataError(f"{record_where(record, i)}: no question 'text' in record (keys: {found})",
                            "set data.text_column to the question's column")
        return text

    def _image(self, record: Record, i: int) -> torch.Tensor:
        if record.get("image") is None:
            raise DataError(f"{record_where(record, i)}: no 'image' in record", "set data.image_column")
        return image_tensor(record, i, self.in_channels, self.image_size)

    def encode(self, records: Sequence[Record]) -> list[dict[str, Any]]:
        """Items `{"image": uint8 (C, S, S), "input_ids": (T,) long[, "label": long][, "type": str]}`."""
        from dapeng.data.tokenizers import encode_texts

        if self.tokenizer is None:
            raise DataError(f"{self.name}: encode before setup", "call setup(train) or from_state(state)")
        ids = encode_texts(self.tokenizer, [self._question(r, i) for i, r in enumerate(records)],
                           self.options.max_length)
        cache: dict[int, torch.Tensor] = {}  # records sharing one image array share its tensor
        items = []
        for i, (r, seq) in enumerate(zip(records, ids)):
            key = id(r.get("image"))
            if key not in cache:
                cache[key] = self._image(r, i)
            item: dict[str, Any] = {"image": cache[key], "input_ids": torch.tensor(seq, dtype=torch.long)}
            label = self.label_id(r, i)
            if label is not None:
                item["label"] = torch.tensor(label)
            if isinstance(r.get("type"), str):
                item["type"] = r["type"]
            items.append(item)
        return items

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """images (B, C, S, S) normalised, input_ids / attention_mask (B, T), labels (B,), types [B]."""
        from dapeng.data.tokenizers import pad_batch

        images = torch.stack([it["image"] for it in items]).float().div_(255)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        images = (images - mean) / std
        if self.options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        ids, mask = pad_batch([it["input_ids"] for it in items], self.pad_id)
        batch: dict[str, Any] = {"images": images, "input_ids": ids, "attention_mask": mask}
        if all("label" in it for it in items):
            batch["labels"] = torch.stack([it["label"] for it in items])
        if all("type" in it for it in items):
            batch["types"] = [it["type"] for it in items]
        return batch

    # -- model side -----------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"logits": model(batch["images"], batch["input_ids"], batch["attention_mask"])}

    def metric(self) -> VQAMetric:
        return VQAMetric(self.labels)

    # -- save / load ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        from dapeng.data.tokenizers import tokenizer_json

        return {**self.base_state(), "tokenizer": tokenizer_json(self.tokenizer), "in_channels": self.in_channels,
                "image_size": self.image_size, "mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> VQATask:
        """Rebuild for inference from `state()` (dapeng.json "labels" + "preprocess" + tokenizer.json)."""
        from dapeng.data.tokenizers import load_tokenizer

        options = dict(state.get("options") or {})
        options.pop("tokenizer_path", None)
        task = cls(**options)
        task.restore_labels(state)
        try:
            task.tokenizer = load_tokenizer(state["tokenizer"])
            task.in_channels, task.image_size = int(state["in_channels"]), int(state["image_size"])
            task.mean = [float(x) for x in state["mean"]]
            task.std = [float(x) for x in state["std"]]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{cls.name} state lacks {err}", "the Artifact's preprocess is incomplete") from None
        task._finish_tokenizer()
        return task


__all__ = ["VQAMetric", "VQAOptions", "VQATask"]
