"""Image–text contrastive learning (CLIP): matching images with their captions, zero-shot classifiers.

Records are `{"image": uint8 array, "text": caption}` (a `"label"` may ride along for zero-shot
evaluation; the loss never reads it). The model is `clip` (models/clip.py). The loss is CLIP's
symmetric InfoNCE over the batch's (B, B) image-caption logits, with one change for data whose
captions repeat (open_clip#821): captions identical after tokenization are all positives of each
other's images — the target of an image is spread evenly over every copy of its caption — instead
of the copies being pushed apart as negatives. With distinct captions it is CLIP's loss exactly.

Evaluation embeds every image and caption of the split and reports retrieval recall@1/@5: image→text
with every image a query against the split's distinct captions, text→image with every distinct
caption a query against all images; a hit is a caption equal (after tokenization) to the image's own,
an image whose caption equals the query. `predict` scores an (image, text) pair by cosine similarity; `embed` gives text
embeddings; `zero_shot` classifies images by their nearest class prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from dapeng.errors import DataError
from dapeng.records import Record
from dapeng.tasks._classification import parse_options, where
from dapeng.tasks._words import WordOptions, glove_init
from dapeng.tasks.base import Capabilities
from dapeng.tasks.image_classification import channel_stats, image_geometry, image_tensor

SCORE_OUTPUT = {"type": "object", "properties": {"score": {"type": "number", "description": "cosine similarity"}},
                "required": ["score"]}


class ImageTextOptions(WordOptions):
    """`task_options` of image-text-contrastive."""

    tokenizer: Literal["wordpiece", "bpe", "word"] = "word"
    max_length: int = Field(32, gt=2, description="caption tokens kept")
    image_size: int | None = Field(None, gt=0, description="resize to this square size (default: the training size)")
    duplicate_captions: Literal["positives", "negatives"] = Field(
        "positives", description="identical captions in a batch: positives of each other's images (open_clip#821), "
        "or negatives as in plain CLIP")


def contrastive_loss(logits: torch.Tensor, caption_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over (B, B) image→text logits; rows and columns with equal `caption_ids` are positives.

    Args:
        logits: scaled similarities, image i (row) against caption j (column).
        caption_ids: (B,) one id per caption, equal for identical captions; None: every caption distinct.
    """
    b = logits.shape[0]
    if caption_ids is None:
        targets = torch.eye(b, device=logits.device)
    else:
        targets = (caption_ids[:, None] == caption_ids[None, :]).float()  # (B, B), symmetric
    targets = targets / targets.sum(1, keepdim=True)
    logits = logits.float()
    image_to_text = -(targets * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(targets.T * logits.T.log_softmax(1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Share of queries (rows) with a relevant item (True in `relevant`) among their `k` most similar columns."""
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices  # (Q, k)
    return relevant.gather(1, top).any(1).float().mean().item()


class RetrievalMetric:
    """Embeds a whole split, then recall@1/@5 both ways over it (chunked: a 10k gallery stays small)."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        self.texts: list[torch.Tensor] = []
        self.captions: list[torch.Tensor] = []

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        self.images.append(outputs["image_embeds"].detach().float().cpu())
        self.texts.append(outputs["text_embeds"].detach().float().cpu())
        self.captions.append(batch["caption_ids"].cpu())

    def compute(self) -> dict[str, float]:
        if not self.images:
            return {}
        images, texts, captions = torch.cat(self.images), torch.cat(self.texts), torch.cat(self.captions)
        # one copy of each distinct caption: ten copies of "a red circle" would fill an image's top 5
        distinct, first = _first_of_each(captions)
        out: dict[str, float] = {}
        for name, queries, query_ids, gallery, gallery_ids in (("i2t", images, captions, texts[first], distinct),
                                                               ("t2i", texts[first], distinct, images, captions)):
            hits = {1: 0.0, 5: 0.0}
            for start in range(0, len(queries), 1024):
                sims = queries[start:start + 1024] @ gallery.T  # (chunk, N)
                relevant = query_ids[start:start + 1024, None] == gallery_ids[None, :]
                for k in hits:
                    hits[k] += recall_at_k(sims, relevant, k) * len(sims)
            out.update({f"recall_at_{k}_{name}": v / len(queries) for k, v in hits.items()})
        return out


def _first_of_each(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of `ids` and the position of each one's first occurrence."""
    distinct, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((len(distinct),), len(ids), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(ids)), reduce="amin")
    return distinct, first


class ImageTextContrastiveTask:
    """Images and captions in one embedding space. Options: see `ImageTextOptions`."""

    name = "image-text-contrastive"
    capabilities = Capabilities(input="image+text", output="score", verbs=frozenset({"predict", "embed"}),
                                output_schema=SCORE_OUTPUT)

    def __init__(self, **options: Any) -> None:
        self.options: ImageTextOptions = parse_options(ImageTextOptions, self.name, options)
        self.tokenizer: Any = None
        self.pad_id = 0
        self.in_channels = 0
        self.image_size = 0
        self.mean: list[float] = []
        self.std: list[float] = []

    # -- setup ----------------------------------------------------------------------------

    def setup(self, train: Sequence[Record]) -> None:
        from dapeng.data.tokenizers import load_tokenizer, train_tokenizer

        opts = self.options
        if opts.tokenizer_path:
            self.tokenizer = load_tokenizer(opts.tokenizer_path)
        else:
            captions = [self._caption(r, i) for i, r in enumerate(train)]
            self.tokenizer = train_tokenizer(captions, opts.tokenizer, opts.vocab_size, opts.lowercase,
                                             opts.min_frequency)
        self._finish_tokenizer()
        self.in_channels, self.image_size = image_geometry(train, opts.image_size)
        images = torch.stack([self._image(r, i) for i, r in enumerate(train[:20000])])
        self.mean, self.std = channel_stats(images)

    def _finish_tokenizer(self) -> None:
        from dapeng.data.tokenizers import PAD, special_id

        self.tokenizer.no_padding()  # padding is collate's (text_classification.py says why)
        self.pad_id = special_id(self.tokenizer, PAD, fallback=0)

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": self.tokenizer.get_vocab_size(), "pad_id": self.pad_id,
                "in_channels": self.in_channels, "image_size": self.image_size}

    def init_model(self, model: nn.Module) -> None:
        """Copy GloVe vectors into the text tower's embeddings (when `glove: true`); the runner calls this."""
        if self.options.glove:
            self.glove_coverage = glove_init(model, self.tokenizer, self.options.freeze_embeddings)

    # -- records → tensors ----------------------------------------------------------------

    def _caption(self, record: Record, i: int) -> str:
        text = record.get("text")
        if not isinstance(text, str):
            found = ", ".join(k for k in record if not k.startswith("_"))
            raise DataError(f"{where(record, i)}: no caption 'text' in record (keys: {found})",
                            "set data.text_column to the caption's column")
        return text

    def _image(self, record: Record, i: int) -> torch.Tensor:
        if record.get("image") is None:
            raise DataError(f"{where(record, i)}: no 'image' in record", "set data.image_column")
        return image_tensor(record, i, self.in_channels, self.image_size)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        from dapeng.data.tokenizers import encode_texts

        if self.tokenizer is None:
            raise DataError(f"{self.name}: encode before setup", "call setup(train) or from_state(state)")
        return encode_texts(self.tokenizer, list(texts), self.options.max_length)

    def encode(self, records: Sequence[Record]) -> list[dict[str, Any]]:
        """Items `{"image": uint8 (C, S, S), "input_ids": (T,) long}`."""
        ids = self._ids([self._caption(r, i) for i, r in enumerate(records)])
        return [{"image": self._image(r, i), "input_ids": torch.tensor(seq, dtype=torch.long)}
                for i, (r, seq) in enumerate(zip(records, ids))]

    def _images(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        images = torch.stack(list(tensors)).float().div_(255)
        return (images - torch.tensor(self.mean).view(1, -1, 1, 1)) / torch.tensor(self.std).view(1, -1, 1, 1)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """images (B, C, S, S) normalised, input_ids / attention_mask (B, T), caption_ids (B,)."""
        from dapeng.data.tokenizers import pad_batch

        ids, mask = pad_batch([it["input_ids"] for it in items], self.pad_id)
        # equal token ids = the same caption; hash() of a tuple of ints is the same in every process
        captions = torch.tensor([hash(tuple(it["input_ids"].tolist())) for it in items], dtype=torch.long)
        return {"images": self._images([it["image"] for it in items]), "input_ids": ids, "attention_mask": mask,
                "caption_ids": captions}

    # -- model side -----------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        outputs = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        return {**outputs, "score": (outputs["image_embeds"] * outputs["text_embeds"]).sum(-1)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.forward(model, batch)
        groups = batch["caption_ids"] if self.options.duplicate_captions == "positives" else None
        return contrastive_loss(outputs["logits"], groups), outputs

    def metric(self) -> RetrievalMetric:
        return RetrievalMetric()

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[dict[str, float]]:
        return [{"score": float(s)} for s in outputs["score"].detach().float().cpu()]

    def embed(self, model: nn.Module, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length text embeddings, (n, D)."""
        from dapeng.data.tokenizers import pad_batch

        ids = [torch.tensor(seq, dtype=torch.long) for seq in self._ids(texts)]
        device = next(model.parameters()).device
        parts = []
        for start in range(0, len(ids), batch_size):
            batch, mask = pad_batch(ids[start:start + batch_size], self.pad_id)
            parts.append(model.encode_text(batch.to(device), mask.to(device)).float().cpu().numpy())
        return np.concatenate(parts)

    def zero_shot(self, model: nn.Module, records: Sequence[Record], prompts: Mapping[str, str],
                  batch_size: int = 256) -> list[str]:
        """Each record's class: the class whose prompt (class → text) is nearest to its image."""
        classes = list(prompts)
        model.eval()
        with torch.inference_mode():
            text = torch.from_numpy(self.embed(model, [prompts[c] for c in classes]))  # (K, D)
            device = next(model.parameters()).device
            predicted = []
            for start in range(0, len(records), batch_size):
                chunk = records[start:start + batch_size]
                images = self._images([self._image(r, start + i) for i, r in enumerate(chunk)]).to(device)
                sims = model.encode_image(images).float().cpu() @ text.T  # (B, K)
                predicted += [classes[j] for j in sims.argmax(1).tolist()]
        return predicted

    # -- save / load ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        from dapeng.data.tokenizers import tokenizer_json

        return {"options": self.options.model_dump(mode="json"), "tokenizer": tokenizer_json(self.tokenizer),
                "in_channels": self.in_channels, "image_size": self.image_size, "mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ImageTextContrastiveTask:
        """Rebuild for inference from `state()` (dapeng.json "preprocess" + tokenizer.json)."""
        from dapeng.data.tokenizers import load_tokenizer

        options = dict(state.get("options") or {})
        options.pop("tokenizer_path", None)
        task = cls(**options)
        try:
            task.tokenizer = load_tokenizer(state["tokenizer"])
            task.in_channels, task.image_size = int(state["in_channels"]), int(state["image_size"])
            task.mean = [float(x) for x in state["mean"]]
            task.std = [float(x) for x in state["std"]]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{cls.name} state lacks {err}", "the Artifact's preprocess is incomplete") from None
        task._finish_tokenizer()
        return task


__all__ = ["ImageTextContrastiveTask", "ImageTextOptions", "RetrievalMetric", "contrastive_loss", "recall_at_k"]
