"""Augmentation on batched tensors with torch ops: one call per batch, no per-item Python loop.

Images (B, C, H, W): random crop with padding, horizontal/vertical flips, small affine
(rotation, translation, scale), random erasing. Text (B, T) ids: token dropout (to
[UNK]), adjacent swaps, and synonym replacement from GloVe neighbours. Randomness comes
from torch's global generator (the Trainer seeds it), or an explicit `generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(
    n: int, low: float, high: float, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=like.device) * (high - low) + low


def random_crop(
    images: torch.Tensor,
    padding: int,
    fill: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pad each side by `padding` with `fill`, then take a random H×W window per image."""
    b, c, h, w = images.shape
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    padded = fill_t.expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = images
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=images.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=images.device)
    rows = (oy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]  # (B, C, H, W)


def random_flip(
    images: torch.Tensor, dim: int = -1, p: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Flip each image along `dim` (-1: left-right, -2: up-down) with probability `p`."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip[:, None, None, None], images.flip(dim), images)


def random_affine(
    images: torch.Tensor,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: float = 0.0,
    fill: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rotate by ±`degrees`, shift by ±`translate` of the size, zoom by 1±`scale`, per image."""
    b = images.shape[0]
    angle = _uniform(b, -degrees, degrees, images, generator) * (math.pi / 180)
    zoom = _uniform(b, 1 - scale, 1 + scale, images, generator)
    tx = _uniform(b, -translate, translate, images, generator) * 2  # grid coordinates span [-1, 1]
    ty = _uniform(b, -translate, translate, images, generator) * 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    # sample (image - fill) with zero padding, so areas brought in from outside take the fill value
    return (
        F.grid_sample(images - fill_t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        + fill_t
    )


def random_erasing(
    images: torch.Tensor,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.2),
    aspect: tuple[float, float] = (0.3, 3.3),
    value: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Blank one random rectangle per image with probability `p` (Zhong et al. 2017)."""
    b, _, h, w = images.shape
    frac = _uniform(b, *area, images, generator)
    log_ratio = _uniform(b, math.log(aspect[0]), math.log(aspect[1]), images, generator)
    ratio = torch.exp(log_ratio)
    eh = (torch.sqrt(frac * h * w * ratio)).clamp(1, h).long()
    ew = (torch.sqrt(frac * h * w / ratio)).clamp(1, w).long()
    y0 = (torch.rand(b, generator=generator, device=images.device) * (h - eh + 1)).long()
    x0 = (torch.rand(b, generator=generator, device=images.device) * (w - ew + 1)).long()
    ys = torch.arange(h, device=images.device)[None, :]
    xs = torch.arange(w, device=images.device)[None, :]
    in_y = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])  # (B, H)
    in_x = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])  # (B, W)
    apply = torch.rand(b, generator=generator, device=images.device) < p
    mask = (in_y[:, :, None] & in_x[:, None, :] & apply[:, None, None])[:, None]  # (B, 1, H, W)
    value_t = torch.as_tensor(value, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    return torch.where(mask, value_t, images)


@dataclass(frozen=True)
class ImageAugment:
    """The image augmentations of a config, applied in order to a training batch.

    Args:
        crop_padding: pixels of padding for the random crop (0: off).
        hflip: random left-right flips.
        vflip: random up-down flips.
        degrees: largest rotation of the affine jitter.
        translate: largest shift, as a fraction of the size.
        scale: largest zoom change (0.1: 0.9–1.1).
        erasing: probability of random erasing per image (0: off).
    """

    crop_padding: int = 0
    hflip: bool = False
    vflip: bool = False
    degrees: float = 0.0
    translate: float = 0.0
    scale: float = 0.0
    erasing: float = 0.0

    @property
    def active(self) -> bool:
        return bool(
            self.crop_padding
            or self.hflip
            or self.vflip
            or self.degrees
            or self.translate
            or self.scale
            or self.erasing
        )

    def __call__(
        self, images: torch.Tensor, fill: float | torch.Tensor = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) → (B, C, H, W); `fill` is the value of "empty" pixels (black, normalised)."""
        memory_format = (
            torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else None
        )
        x = images
        if self.crop_padding:
            x = random_crop(x, self.crop_padding, fill, generator)
        if self.hflip:
            x = random_flip(x, -1, 0.5, generator)
        if self.vflip:
            x = random_flip(x, -2, 0.5, generator)
        if self.degrees or self.translate or self.scale:
            x = random_affine(x, self.degrees, self.translate, self.scale, fill, generator)
        if self.erasing:
            x = random_erasing(x, self.erasing, value=fill, generator=generator)
        return x.contiguous(memory_format=memory_format) if memory_format else x


@dataclass
class TextAugment:
    """Token-level noise for a training batch of ids.

    Args:
        dropout: probability of replacing a real token by [UNK].
        swap: probability of swapping a token with its right neighbour.
        synonym: probability of replacing a token by one of its `neighbours`.
        unk_id: the [UNK] id.
        protected: ids never touched (padding, [CLS], [SEP], ...).
        neighbours: (V, k) ids of each token's nearest words, -1 where there are none.
    """

    dropout: float = 0.0
    swap: float = 0.0
    synonym: float = 0.0
    unk_id: int = 1
    protected: tuple[int, ...] = ()
    neighbours: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return bool(self.dropout or self.swap or (self.synonym and self.neighbours is not None))

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, T) ids, (B, T) bool mask → (B, T) ids; padding and protected ids stay as they are."""
        ids = input_ids.clone()
        editable = attention_mask.bool().clone()
        for t in self.protected:
            editable &= ids != t
        if self.synonym and self.neighbours is not None:
            table = self.neighbours.to(ids.device)
            k = table.shape[1]
            pick = torch.randint(0, k, ids.shape, generator=generator, device=ids.device)
            candidate = table[ids, pick]  # (B, T)
            replace = (
                editable
                & (candidate >= 0)
                & (torch.rand(ids.shape, generator=generator, device=ids.device) < self.synonym)
            )
            ids = torch.where(replace, candidate, ids)
        if self.swap:
            # swap positions t and t+1 where both are editable; skip a swap right after another
            want = torch.rand(ids.shape, generator=generator, device=ids.device) < self.swap
            want[:, -1] = False
            want &= editable & torch.roll(editable, -1, dims=1)
            want[:, 1:] &= ~want[:, :-1]
            right = torch.roll(ids, -1, dims=1)
            left = torch.roll(ids, 1, dims=1)
            came_from_left = torch.roll(want, 1, dims=1)
            came_from_left[:, 0] = False
            ids = torch.where(want, right, torch.where(came_from_left, left, ids))
        if self.dropout:
            drop = editable & (torch.rand(ids.shape, generator=generator, device=ids.device) < self.dropout)
            ids = ids.masked_fill(drop, self.unk_id)
        return ids
