"""Text classification: a label per text (sentiment, spam, topic).

Records are `{"text": str, "label": str}` (no label at predict time). `setup` learns the
label set and a tokenizer (WordPiece, BPE or word-level, trained on the training split,
or loaded from a tokenizer.json); items are token-id tensors, padded per batch. Training
batches may be augmented (token dropout/swap, GloVe-synonym replacement), and
`init_model` copies GloVe-6B-50d vectors into the model's word embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dapeng.data.augment import TextAugment
from dapeng.errors import DataError
from dapeng.records import Record
from dapeng.tasks._classification import ClassificationTask, Options, label_list, parse_options, where
from dapeng.tasks._words import WordOptions, glove_init
from dapeng.tasks.base import LABEL_OUTPUT, Capabilities


class TextAugmentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    token_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    token_swap: float = Field(0.0, ge=0.0, lt=1.0)
    synonym: float = Field(0.0, ge=0.0, lt=1.0, description="GloVe-neighbour replacement probability")
    synonym_neighbours: int = Field(5, gt=0)
    synonym_min_similarity: float = Field(0.7, ge=-1.0, le=1.0)


class TextOptions(WordOptions, Options):
    """`task_options` of text-classification."""

    max_length: int = Field(256, gt=2)
    special_tokens: bool = Field(True, description="wrap texts in [CLS] … [SEP]")
    augment: TextAugmentOptions = Field(default_factory=TextAugmentOptions)


class TextClassificationTask(ClassificationTask):
    """Text in, one label out. Options: see `TextOptions` (all keyword arguments)."""

    name = "text-classification"
    capabilities = Capabilities(
        input="text", output="label", verbs=frozenset({"predict", "embed", "explain"}),
        explain=("ig", "saliency", "attention", "rollout"), output_schema=LABEL_OUTPUT,
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(parse_options(TextOptions, self.name, options))
        self.options: TextOptions
        self.tokenizer: Any = None
        self.pad_id = 0
        self._augment: TextAugment | None = None

    # -- setup ----------------------------------------------------------------------------

    def setup(self, train: Sequence[Record]) -> None:
        self.set_labels(label_list(train), train)
        self.fit_tokenizer([self._text(r, i) for i, r in enumerate(train)])

    def fit_tokenizer(self, texts: Sequence[str]) -> None:
        """Learn the tokenizer from the training texts, or load `tokenizer_path`."""
        from dapeng.data.tokenizers import load_tokenizer, train_tokenizer

        if self.options.tokenizer_path:
            self.tokenizer = load_tokenizer(self.options.tokenizer_path)
        else:
            self.tokenizer = train_tokenizer(
                texts,
                self.options.tokenizer,
                self.options.vocab_size,
                self.options.lowercase,
                self.options.min_frequency,
            )
            if self.options.glove_vocab:
                self._extend_with_glove()
        self._finish_tokenizer()

    def _extend_with_glove(self) -> None:
        """Append GloVe's most frequent words to the trained word vocabulary (`glove_vocab`)."""
        from dapeng.data.glove import frequent_words
        from dapeng.data.tokenizers import extend_word_vocab

        extend_word_vocab(self.tokenizer, frequent_words(self.options.glove_vocab))

    def _finish_tokenizer(self) -> None:
        from dapeng.data.tokenizers import PAD, UNK, special_id

        # A tokenizer.json may come with padding switched on (to the batch's longest text, or a
        # fixed length): its pads would be ids of real tokens to `collate`'s attention mask, and
        # a text's prediction would change with what else is in its batch. Padding is collate's.
        self.tokenizer.no_padding()
        self.pad_id = special_id(self.tokenizer, PAD, fallback=0)
        self.unk_id = special_id(self.tokenizer, UNK, fallback=self.pad_id)

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "vocab_size": self.tokenizer.get_vocab_size(),
            "num_labels": len(self.labels),
            "pad_id": self.pad_id,
        }

    def init_model(self, model: nn.Module) -> None:
        """Copy GloVe vectors into the model's word embeddings (when `glove: true`); the runner calls this."""
        if not self.options.glove:
            return
        self.glove_coverage = glove_init(model, self.tokenizer, self.options.freeze_embeddings)

    # -- records → tensors ----------------------------------------------------------------

    def _text(self, record: Record, i: int) -> str:
        text = record.get("text")
        if not isinstance(text, str):
            found = ", ".join(k for k in record if not k.startswith("_"))
            raise DataError(
                f"{where(record, i)}: no 'text' in record (keys: {found})", "set data.text_column"
            )
        return text

    def encode(self, records: Sequence[Record]) -> list[dict[str, Any]]:
        """Items `{"input_ids": (T,) long[, "label": long]}`; an unknown label raises a DataError naming it."""
        from dapeng.data.tokenizers import encode_texts

        if self.tokenizer is None:
            raise DataError(
                "text-classification: encode before setup", "call setup(train) or from_state(state)"
            )
        labels = [self.label_id(r, i) for i, r in enumerate(records)]
        ids = encode_texts(
            self.tokenizer,
            [self._text(r, i) for i, r in enumerate(records)],
            self.options.max_length,
            self.options.special_tokens,
        )
        items = []
        for seq, label in zip(ids, labels):
            item: dict[str, Any] = {"input_ids": torch.tensor(seq, dtype=torch.long)}
            if label is not None:
                item["label"] = torch.tensor(label)
            items.append(item)
        return items

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad to the longest item of the batch: input_ids (B, T), attention_mask (B, T), labels (B,)."""
        from dapeng.data.tokenizers import pad_batch

        ids, mask = pad_batch([it["input_ids"] for it in items], self.pad_id)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if all("label" in it for it in items):
            batch["labels"] = torch.stack([it["label"] for it in items])
        return batch

    def batch_sampler(self, items: Sequence[dict[str, Any]], batch_size: int, seed: int = 0):
        """Length-bucketed training batches (less padding); for loops that take a batch sampler."""
        from dapeng.data.tokenizers import LengthBucketSampler

        return LengthBucketSampler(
            [len(it["input_ids"]) for it in items], batch_size, shuffle=True, seed=seed
        )

    # -- model side -----------------------------------------------------------------------

    def augmenter(self) -> TextAugment | None:
        """The configured token noise, built once (the GloVe neighbour table takes seconds)."""
        opts = self.options.augment
        if not (opts.token_dropout or opts.token_swap or opts.synonym):
            return None
        if self._augment is None:
            from dapeng.data.tokenizers import CLS, MASK, SEP

            neighbours = None
            if opts.synonym:
                from dapeng.data.glove import glove_neighbours
                from dapeng.data.tokenizers import vocab_words

                table = glove_neighbours(
                    vocab_words(self.tokenizer),
                    self.tokenizer.get_vocab_size(),
                    opts.synonym_neighbours,
                    opts.synonym_min_similarity,
                )
                neighbours = torch.from_numpy(table)
            protected = tuple(
                t for t in (self.tokenizer.token_to_id(s) for s in (CLS, SEP, MASK)) if t is not None
            )
            self._augment = TextAugment(
                opts.token_dropout,
                opts.token_swap,
                opts.synonym,
                self.unk_id,
                (self.pad_id, *protected),
                neighbours,
            )
        return self._augment

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        augment = self.augmenter() if model.training else None
        if augment is not None:
            ids = augment(ids, mask)
        return {"logits": model(ids, mask)}

    def embed(self, model: nn.Module, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """The model's pooled features for each text, (n, D), `batch_size` texts per forward pass."""
        device = next(model.parameters()).device
        items = self.encode([{"text": t} for t in texts])
        parts = []
        for start in range(0, len(items), batch_size):
            batch = self.collate(items[start : start + batch_size])
            feats = model.forward_features(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            parts.append(feats.float().cpu().numpy())
        return np.concatenate(parts)

    # -- save / load ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        from dapeng.data.tokenizers import tokenizer_json

        return {**self.base_state(), "tokenizer": tokenizer_json(self.tokenizer)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TextClassificationTask:
        """Rebuild for inference from `state()` (or dapeng.json "labels" + "preprocess" + tokenizer.json)."""
        from dapeng.data.tokenizers import load_tokenizer

        options = dict(state.get("options") or {})
        options.pop("tokenizer_path", None)
        task = cls(**options)
        task.restore_labels(state)
        if not state.get("tokenizer"):
            raise DataError(
                "text-classification state has no tokenizer", "the Artifact needs its tokenizer.json"
            )
        task.tokenizer = load_tokenizer(state["tokenizer"])
        task._finish_tokenizer()
        return task
