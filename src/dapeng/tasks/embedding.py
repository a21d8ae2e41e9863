"""Task `sentence-embedding`: texts → unit vectors with the model's own pooling (search, clustering).

Inference is `embed(model, texts)` → an (n, dim) float32 array: tokenize, encode, pool
(the model's `forward_features`, e.g. MiniLM's mean over real tokens) and L2-normalise
when the original model does. Fine-tuning takes records `{"text": ..., "positive": ...}`
and trains with the in-batch contrastive loss of sentence-transformers
(MultipleNegativesRankingLoss): each text must pick its own positive among the batch's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dapeng.errors import DataError
from dapeng.tasks.base import VECTOR_OUTPUT, Batch, Capabilities, Item, Record

__all__ = ["SentenceEmbedding"]


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask  # (B, T), (B, T)


class _RetrievalAccuracy:
    """Share of texts whose nearest in-batch candidate is their own positive."""

    def __init__(self) -> None:
        self.hits = 0
        self.total = 0

    def update(self, outputs: dict[str, torch.Tensor], batch: Batch) -> None:
        scores = outputs["scores"]  # (B, B)
        self.hits += int((scores.argmax(dim=1) == torch.arange(scores.shape[0])).sum())
        self.total += scores.shape[0]

    def compute(self) -> dict[str, float]:
        return {"retrieval_accuracy": self.hits / max(self.total, 1)}


class SentenceEmbedding:
    """Sentence embeddings from a text encoder (the `transformer` with mean/cls pooling).

    Args:
        tokenizer: a Hugging Face `tokenizers` JSON string (the pretrained model's own).
        normalize: L2-normalise the pooled vectors (sentence-transformers' Normalize module).
        max_length: longest input in tokens; longer texts are truncated.
        pad_id: padding token id.
        temperature: scale of the contrastive loss' cosine scores (sentence-transformers: 1/20).
    """

    name = "sentence-embedding"
    capabilities = Capabilities(input="text", output="vector", verbs=frozenset({"predict", "embed"}),
                                output_schema=VECTOR_OUTPUT)

    def __init__(
        self,
        tokenizer: str | None = None,
        normalize: bool = True,
        max_length: int = 256,
        pad_id: int = 0,
        temperature: float = 0.05,
    ) -> None:
        self.tokenizer_json = tokenizer
        self.normalize = normalize
        self.max_length = max_length
        self.pad_id = pad_id
        self.temperature = temperature
        self._tokenizer: Any = None

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SentenceEmbedding:
        known = ("tokenizer", "normalize", "max_length", "pad_id", "temperature")
        return cls(**{k: state[k] for k in known if k in state})

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.tokenizer_json is None:
                raise DataError("sentence-embedding needs a pretrained tokenizer", "set model.init: minilm-l6")
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
            self._tokenizer.enable_truncation(self.max_length)
        return self._tokenizer

    def use_tokenizer(self, tokenizer_json: str) -> None:
        """Adopt a pretrained model's tokenizer (called when a run starts from `model.init`)."""
        self.tokenizer_json = tokenizer_json
        self._tokenizer = None

    def setup(self, train: Sequence[Record]) -> None:
        """Nothing to learn from the data: the tokenizer comes with the pretrained model."""
        self.tokenizer  # noqa: B018 - fail early without a tokenizer

    def model_kwargs(self) -> dict[str, Any]:
        """The sizes the data fixes: the pad id, and the vocabulary of the tokenizer (when it has one)."""
        if self.tokenizer_json is None:
            return {"pad_id": self.pad_id}
        return {"pad_id": self.pad_id, "vocab_size": self.tokenizer.get_vocab_size()}

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, records: Sequence[Record]) -> list[Item]:
        try:
            texts = [r["text"] for r in records]
            positives = [r["positive"] for r in records]
        except KeyError as err:
            raise DataError(f"sentence-embedding records need 'text' and 'positive' fields, missing {err}",
                            "give pairs of related texts") from None
        return [{"ids": a, "positive": b} for a, b in zip(self._ids(texts), self._ids(positives))]

    def collate(self, items: list[Item]) -> Batch:
        ids, mask = _pad([it["ids"] for it in items], self.pad_id)
        pos_ids, pos_mask = _pad([it["positive"] for it in items], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "positive_ids": pos_ids, "positive_mask": pos_mask}

    def pool(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids → (B, D) sentence vectors, normalised when the model's recipe says so."""
        features = model.forward_features(input_ids, attention_mask)  # (B, D)
        return F.normalize(features.float(), dim=-1) if self.normalize else features.float()

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = F.normalize(self.pool(model, batch["input_ids"], batch["attention_mask"]), dim=-1)  # (B, D)
        b = F.normalize(self.pool(model, batch["positive_ids"], batch["positive_mask"]), dim=-1)  # (B, D)
        scores = a @ b.t() / self.temperature  # (B, B)
        target = torch.arange(scores.shape[0], device=scores.device)
        return F.cross_entropy(scores, target), {"scores": scores.detach()}

    def metric(self) -> _RetrievalAccuracy:
        return _RetrievalAccuracy()

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[Any]:
        return outputs["embeddings"].float().cpu().tolist()

    def state(self) -> dict[str, Any]:
        return {"labels": None, "tokenizer": self.tokenizer_json, "normalize": self.normalize,
                "max_length": self.max_length, "pad_id": self.pad_id, "temperature": self.temperature}

    @torch.inference_mode()
    def embed(self, model: nn.Module, texts: Iterable[str] | str, batch_size: int = 64) -> np.ndarray:
        """Texts → (n, dim) float32 sentence embeddings (one text gives shape (1, dim)).

        Texts are batched by length so padding costs little; output rows follow input order.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise DataError("no texts to embed", "pass at least one string")
        if not all(isinstance(t, str) for t in texts):
            raise DataError("embed takes strings", "pass a list of texts")
        model.eval()
        ids = self._ids(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        device = next(model.parameters()).device
        vectors: list[np.ndarray] = [np.empty(0)] * len(ids)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, mask = _pad([ids[i] for i in chunk], self.pad_id)
            # .float(): under bf16 autocast the pooled vectors are bf16, which numpy has no type for
            pooled = self.pool(model, input_ids.to(device), mask.to(device)).float().cpu().numpy()  # (b, D)
            for row, i in zip(pooled, chunk):
                vectors[i] = row
        return np.stack(vectors).astype(np.float32, copy=False)
