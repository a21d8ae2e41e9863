"""Task `contrastive`: self-supervised pretraining of a backbone by telling two views of an input apart from the rest.

Images (SimCLR, Chen et al. 2020): each batch image is augmented twice (random crop, flips,
small affine, erasing: `dapeng.data.augment`), both views go through the backbone
(`forward_features`) and the projection head (the model's own `head`, `projection_dim`
outputs), and NT-Xent (`nt_xent`) asks each view to find its twin among the other 2B - 1
views, at `temperature`. Sentences (sentence-transformers' MultipleNegativesRankingLoss):
a text and its `positive` (a pair), or the same text twice under dropout (SimCSE, Gao et
al. 2021), with the rest of the batch as negatives (`in_batch_negatives`).

Labels are never trained on; where the records carry them, the metric fits a linear probe
(logistic regression on the frozen backbone features of the evaluation split, two-fold)
and reports its accuracy beside the views' retrieval accuracy. The saved Artifact is the
backbone: `predict` (and, for text, `embed`) gives its features; as a later run's
`model.init` it gives them to any task of the same architecture, and the projection head
stays behind (`dapeng.hub.init` drops `head.*` for another task).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dapeng.errors import DataError
from dapeng.records import Record
from dapeng.tasks._classification import parse_options
from dapeng.tasks.base import VECTOR_OUTPUT, Capabilities
from dapeng.tasks.image_classification import ImageAugmentOptions, ImageClassificationTask
from dapeng.tasks.text_classification import TextAugmentOptions, TextClassificationTask

__all__ = ["Contrastive", "ContrastiveMetric", "in_batch_negatives", "linear_probe", "nt_xent"]

IMAGE_CAPABILITIES = Capabilities(input="image", output="vector", verbs=frozenset({"predict"}),
                                  output_schema=VECTOR_OUTPUT)
TEXT_CAPABILITIES = Capabilities(input="text", output="vector", verbs=frozenset({"predict", "embed"}),
                                 output_schema=VECTOR_OUTPUT)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's normalised-temperature cross-entropy over two views.

    Args:
        a, b: (B, D) the two views' projections; row i of `a` and of `b` come from the same input.
        temperature: divides the cosine similarities.

    Returns:
        (the mean loss over all 2B views, the (2B, 2B) similarity logits with -inf on the diagonal).
    """
    z = F.normalize(torch.cat([a, b]).float(), dim=-1)  # (2B, D)
    logits = z @ z.t() / temperature  # (2B, 2B)
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = a.shape[0]
    twin = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # view i's twin: i ± B
    return F.cross_entropy(logits, twin), logits


def in_batch_negatives(a: torch.Tensor, b: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MultipleNegativesRankingLoss: each anchor of `a` (B, D) must pick its own row of `b` among all B.

    Returns:
        (the mean loss, the (B, B) cosine-similarity logits).
    """
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t() / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device)), logits


def linear_probe(features: np.ndarray, labels: np.ndarray, test_features: np.ndarray | None = None,
                 test_labels: np.ndarray | None = None, seed: int = 0) -> float:
    """Accuracy of a logistic regression on frozen features (standardised), on held-out rows.

    With test features, fit on `features` and score on them; else two-fold cross-fitting over
    a seeded half split of `features`.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def score(x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> float:
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        return float(probe.fit(x, y).score(xt, yt))

    if test_features is not None and test_labels is not None:
        return score(features, labels, test_features, test_labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    half = len(order) // 2
    first, second = order[:half], order[half:]
    folds = [(first, second), (second, first)]
    return float(np.mean([score(features[i], labels[i], features[j], labels[j]) for i, j in folds
                          if len(np.unique(labels[i])) > 1]))


class ContrastiveMetric:
    """Retrieval accuracy of the views (each finds its twin first) and, with labels, a linear probe's accuracy."""

    def __init__(self) -> None:
        self.hits = 0
        self.total = 0
        self.features: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        logits = outputs["similarities"]  # (N, M): row i's positive sits at outputs["twin"][i]
        self.hits += int((logits.argmax(1) == outputs["twin"]).sum())
        self.total += logits.shape[0]
        if "labels" in batch and outputs["features"].numel():
            self.features.append(outputs["features"].float().cpu().numpy())
            self.labels.append(batch["labels"].cpu().numpy())

    def compute(self) -> dict[str, float]:
        out = {"retrieval_accuracy": self.hits / max(self.total, 1)}
        if self.labels:
            labels = np.concatenate(self.labels)
            if len(labels) >= 20 and len(np.unique(labels)) > 1:
                out["linear_probe_accuracy"] = linear_probe(np.concatenate(self.features), labels)
        return out


class ContrastiveOptions(BaseModel):
    """`task_options` of contrastive."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float | None = Field(None, gt=0.0, description="default: 0.5 for images (SimCLR), 0.05 for text")
    projection_dim: int = Field(128, gt=0, description="outputs of the projection head (the model's head)")
    projection: bool = Field(True, description="train through the projection head; false: on the features")
    views: Literal["auto", "augment", "dropout", "pairs"] = Field(
        "auto", description="images: augment; text: pairs when records have 'positive', else dropout (SimCSE)")
    image_size: int | None = Field(None, gt=0)
    channels_last: bool = True
    augment: ImageAugmentOptions = Field(
        default_factory=lambda: ImageAugmentOptions(crop_padding=4, hflip=True, degrees=10.0, translate=0.1,
                                                    scale=0.2, erasing=0.5),
        description="images: the augmentation drawn for each view")
    text: dict[str, Any] = Field(default_factory=dict,
                                 description="text: text-classification's tokenizer options (tokenizer, vocab_size, "
                                             "max_length, ...)")
    text_augment: TextAugmentOptions = Field(default_factory=TextAugmentOptions,
                                             description="text: token noise on each view")
    eval_seed: int = 0


class Contrastive:
    """Contrastive pretraining of an image or text backbone. Options: see `ContrastiveOptions`."""

    name = "contrastive"
    # images by default; a text instance declares TEXT_CAPABILITIES (it also embeds)
    capabilities = IMAGE_CAPABILITIES

    def __init__(self, input: str | None = None, **options: Any) -> None:  # noqa: A002 - the Capabilities name
        self.options: ContrastiveOptions = parse_options(ContrastiveOptions, self.name, options)
        self.input: str | None = None
        self.inner: Any = None
        self.labels: list[str] = []
        if input is not None:
            self._choose(input)

    def _choose(self, input: str) -> None:  # noqa: A002
        opts = self.options
        if input == "image":
            self.inner = ImageClassificationTask(image_size=opts.image_size, channels_last=opts.channels_last,
                                                 augment=opts.augment.model_dump())
            self.capabilities = IMAGE_CAPABILITIES
        elif input == "text":
            self.inner = TextClassificationTask(**opts.text, augment=opts.text_augment.model_dump())
            self.capabilities = TEXT_CAPABILITIES
        else:
            raise DataError(f"contrastive input {input!r} is not image or text")
        self.input = input

    @property
    def temperature(self) -> float:
        return self.options.temperature or (0.5 if self.input == "image" else 0.05)

    # -- setup ----------------------------------------------------------------------------

    def setup(self, train: Sequence[Record]) -> None:
        """Image or text from the records; image statistics or the tokenizer; the labels (for the probe only)."""
        if not train:
            raise DataError("contrastive: no training records", "give it images or texts")
        first = train[0]
        self._choose("image" if "image" in first else "text" if "text" in first else "")
        labels = sorted({str(r["label"]) for r in train if r.get("label") is not None})
        self.labels = labels
        self.inner.set_labels(labels)
        if self.input == "image":
            self.inner.fit_images(train)
        else:
            self.inner.fit_tokenizer([self.inner._text(r, i) for i, r in enumerate(train)])

    def use_tokenizer(self, tokenizer_json: str) -> None:
        """Text: adopt a pretrained model's tokenizer (`model.init`)."""
        from dapeng.data.tokenizers import load_tokenizer

        if self.input != "text":
            raise DataError("an image contrastive task takes no tokenizer", "unset model.init or use text records")
        self.inner.tokenizer = load_tokenizer(tokenizer_json)
        self.inner._finish_tokenizer()

    def model_kwargs(self) -> dict[str, Any]:
        kwargs = self.inner.model_kwargs()
        kwargs["num_labels"] = self.options.projection_dim
        return kwargs

    # -- records → items ------------------------------------------------------------------

    def _views(self) -> str:
        views = self.options.views
        if views == "auto":
            return "augment" if self.input == "image" else "dropout"
        return views

    def encode(self, records: Sequence[Record]) -> list[dict[str, Any]]:
        """The inner task's items (image or input_ids, label where known), plus `positive_ids` for text pairs."""
        kept = [r if r.get("label") is None or str(r["label"]) in self.inner.index else
                {k: v for k, v in r.items() if k != "label"} for r in records]
        items = self.inner.encode(kept)
        if self.input == "text" and all("positive" in r for r in records) and self._views() in ("pairs", "dropout"):
            for item, pos in zip(items, self.inner.encode([{"text": r["positive"]} for r in records])):
                item["positive_ids"] = pos["input_ids"]
        return items

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner.collate(items)
        if all("positive_ids" in it for it in items):
            from dapeng.data.tokenizers import pad_batch

            batch["positive_ids"], batch["positive_mask"] = pad_batch([it["positive_ids"] for it in items],
                                                                      self.inner.pad_id)
        return batch

    # -- model side -----------------------------------------------------------------------

    def _project(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        return model.forward_head(features) if self.options.projection else features

    def _image_views(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"]
        mean, std = self.inner._stats(images)
        black = (-mean / std).flatten()
        augment = self.inner.augment
        views = torch.cat([augment(images, fill=black, generator=generator),
                           augment(images, fill=black, generator=generator)])  # (2B, C, H, W)
        return model.forward_features(views).chunk(2)

    def _text_views(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        augment = self.inner.augmenter() if model.training else None

        def features(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return model.forward_features(augment(x, m, generator) if augment is not None else x, m)

        if self._views() == "pairs" or ("positive_ids" in batch and self._views() != "dropout"):
            if "positive_ids" not in batch:
                raise DataError("contrastive views: pairs needs a 'positive' text in every record",
                                "add positives, or set task_options.views: dropout")
            return features(ids, mask), features(batch["positive_ids"], batch["positive_mask"])
        return features(ids, mask), features(ids, mask)  # two dropout masks: two views (SimCSE)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        generator = None
        if not model.training:  # the same views for the same batch: eval figures compare across epochs
            device = next(iter(v for v in batch.values() if torch.is_tensor(v))).device
            generator = torch.Generator(device=device).manual_seed(self.options.eval_seed)
        if self.input == "image":
            fa, fb = self._image_views(model, batch, generator)
        else:
            fa, fb = self._text_views(model, batch, generator)
        a, b = self._project(model, fa), self._project(model, fb)
        n = a.shape[0]
        if self.input == "image":
            loss, logits = nt_xent(a, b, self.temperature)
            twin = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(a.device)
        else:
            loss, logits = in_batch_negatives(a, b, self.temperature)
            twin = torch.arange(n, device=a.device)
        outputs = {"similarities": logits.detach(), "twin": twin, "features": self._clean_features(model, batch)}
        return loss, outputs

    def _clean_features(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Backbone features of the unaugmented inputs, for the linear probe (evaluation only: free in training)."""
        if model.training or "labels" not in batch:
            return torch.empty(0)
        with torch.no_grad():
            return self.forward(model, batch)["embeddings"]

    def metric(self) -> ContrastiveMetric:
        return ContrastiveMetric()

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The backbone features (before the projection head): what `predict` gives."""
        if self.input == "image":
            return {"embeddings": model.forward_features(batch["images"])}
        return {"embeddings": model.forward_features(batch["input_ids"], batch["attention_mask"])}

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[Any]:
        return outputs["embeddings"].float().cpu().tolist()

    def embed(self, model: nn.Module, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Text: the backbone features of each text, (n, D)."""
        if self.input != "text":
            raise DataError("this contrastive model embeds images: use predict")
        return self.inner.embed(model, texts, batch_size=batch_size).astype(np.float32, copy=False)

    # -- save / load ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        inner = self.inner.state()
        inner.pop("labels", None)
        return {"labels": self.labels or None, "input": self.input, "options": self.options.model_dump(mode="json"),
                "inner": {k: v for k, v in inner.items() if k != "tokenizer"},
                **({"tokenizer": inner["tokenizer"]} if "tokenizer" in inner else {})}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Contrastive:
        task = cls(input=state.get("input") or "image", **dict(state.get("options") or {}))
        task.labels = list(state.get("labels") or [])
        # the inner classifier's state needs a label list: the probe's labels, or a placeholder reset below
        inner_state = {**(state.get("inner") or {}), "labels": task.labels or ["unlabeled"]}
        if "tokenizer" in state:
            inner_state["tokenizer"] = state["tokenizer"]
        task.inner = type(task.inner).from_state(inner_state)
        task.inner.set_labels(task.labels)
        return task
