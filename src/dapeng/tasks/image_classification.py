"""Image classification: a label per image.

Records are `{"image": uint8 array (H, W) or (H, W, C), "label": str}` (no label at
predict time). `setup` learns the label set, the channel count, the size and the
per-channel mean/std of the training images; items stay uint8 (a quarter of the memory)
and are normalised per batch in `collate`. Training batches are augmented on the
batched tensor (random crop, flips, small affine, random erasing) inside `forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dapeng.data.augment import ImageAugment
from dapeng.errors import DataError
from dapeng.records import Record
from dapeng.tasks._classification import ClassificationTask, Options, label_list, parse_options, where
from dapeng.tasks.base import LABEL_OUTPUT, Capabilities


class ImageAugmentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_padding: int = Field(0, ge=0)
    hflip: bool = False
    vflip: bool = False
    degrees: float = Field(0.0, ge=0.0, le=180.0)
    translate: float = Field(0.0, ge=0.0, lt=0.5)
    scale: float = Field(0.0, ge=0.0, lt=1.0)
    erasing: float = Field(0.0, ge=0.0, le=1.0)


class ImageOptions(Options):
    """`task_options` of image-classification."""

    image_size: int | None = Field(
        None, gt=0, description="resize to this square size (default: the training size)"
    )
    channels_last: bool = Field(True, description="NHWC batches: faster convolutions, bf16 above all")
    augment: ImageAugmentOptions = Field(default_factory=ImageAugmentOptions)


def _to_array(image: Any, record: Record, i: int) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        try:
            image = np.asarray(image)
        except (TypeError, ValueError):
            image = None
    if image is None or image.ndim not in (2, 3) or image.dtype == object:
        raise DataError(f"{where(record, i)}: 'image' must be an array (H, W) or (H, W, C)")
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image


def image_tensor(record: Record, i: int, in_channels: int, image_size: int) -> torch.Tensor:
    """A record's image as uint8 (C, S, S): channels matched to `in_channels`, resized to `image_size`."""
    image = _to_array(record.get("image"), record, i)
    x = torch.from_numpy(np.array(image, order="C"))  # a copy: catalog images are read-only views
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
    if x.shape[0] == 4:
        x = x[:3]  # drop alpha
    if x.shape[0] != in_channels:
        x = x.expand(3, -1, -1) if in_channels == 3 else x.float().mean(0, keepdim=True).round().to(torch.uint8)
    if x.shape[1:] != (image_size, image_size):
        size = (image_size, image_size)
        x = F.interpolate(x[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def image_geometry(train: Sequence[Record], image_size: int | None) -> tuple[int, int]:
    """The channel count (3 if any training image has colour, else 1) and the square size to use."""
    shapes = {_to_array(r.get("image"), r, i).shape for i, r in enumerate(train)}
    channels = 3 if any(len(s) == 3 and s[2] >= 3 for s in shapes) else 1
    if image_size:
        return channels, image_size
    return channels, max(max(s[0], s[1]) for s in shapes)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, S, S) images, in 0..1."""
    pixels = images.double().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return pixels.mean(1).tolist(), pixels.std(1).clamp_min(1e-3).tolist()


class ImageClassificationTask(ClassificationTask):
    """Images in, one label out. Options: see `ImageOptions` (all keyword arguments)."""

    name = "image-classification"
    capabilities = Capabilities(
        input="image", output="label", verbs=frozenset({"predict", "explain"}),
        explain=("ig", "saliency", "gradcam"), output_schema=LABEL_OUTPUT,
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(parse_options(ImageOptions, self.name, options))
        self.options: ImageOptions
        self.in_channels = 0
        self.image_size = 0
        self.mean: list[float] = []
        self.std: list[float] = []
        self.augment = ImageAugment(**self.options.augment.model_dump())

    def setup(self, train: Sequence[Record]) -> None:
        self.set_labels(label_list(train), train)
        self.fit_images(train)

    def fit_images(self, train: Sequence[Record]) -> None:
        """Learn the channel count, the size and the per-channel mean/std of the training images."""
        self.in_channels, self.image_size = image_geometry(train, self.options.image_size)
        # statistics from up to 20k images
        self.mean, self.std = channel_stats(self._tensors(train[: min(len(train), 20000)]))

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_labels": len(self.labels),
        }

    def _tensor(self, record: Record, i: int) -> torch.Tensor:
        return image_tensor(record, i, self.in_channels, self.image_size)

    def _tensors(self, records: Sequence[Record]) -> torch.Tensor:
        return torch.stack([self._tensor(r, i) for i, r in enumerate(records)])

    def encode(self, records: Sequence[Record]) -> list[dict[str, Any]]:
        """Items `{"image": uint8 (C, S, S)[, "label": long]}`; an unknown label raises a DataError naming it."""
        if not self.image_size:
            raise DataError(
                "image-classification: encode before setup", "call setup(train) or from_state(state)"
            )
        items = []
        for i, r in enumerate(records):
            item: dict[str, Any] = {"image": self._tensor(r, i)}
            label = self.label_id(r, i)
            if label is not None:
                item["label"] = torch.tensor(label)
            items.append(item)
        return items

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)
        return mean, std

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Normalised float images (B, C, S, S) (channels_last by default) and labels (B,)."""
        images = torch.stack([it["image"] for it in items]).float().div_(255)
        mean, std = self._stats(images)
        images = (images - mean) / std
        if self.options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        batch: dict[str, Any] = {"images": images}
        if all("label" in it for it in items):
            batch["labels"] = torch.stack([it["label"] for it in items])
        return batch

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["images"]
        if model.training and self.augment.active:
            mean, std = self._stats(images)
            black = (-mean / std).flatten()  # padding and erasing fill with black, as in the raw images
            images = self.augment(images, fill=black)
        return {"logits": model(images)}

    def state(self) -> dict[str, Any]:
        return {
            **self.base_state(),
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ImageClassificationTask:
        """Rebuild for inference from `state()` (or dapeng.json "labels" + "preprocess")."""
        task = cls(**dict(state.get("options") or {}))
        task.restore_labels(state)
        try:
            task.in_channels = int(state["in_channels"])
            task.image_size = int(state["image_size"])
            task.mean = [float(x) for x in state["mean"]]
            task.std = [float(x) for x in state["std"]]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"image-classification state lacks {err}", "the Artifact's preprocess is incomplete"
            ) from None
        return task
