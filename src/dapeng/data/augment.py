"""Augmentation on batched tensors with torch ops: one call per batch, no per-item Python loop.

Images (B, C, H, W): random crop with padding, horizontal/vertical flips, small affine
(rotation, translation, scale), random erasing; RandAugment (`rand_augment`: random
colour and geometric operations at random magnitudes, on pixels in [0, 1]) and Cutout,
the strong views of semi-supervised learning. Text (B, T) ids: token dropout (to
[UNK]), adjacent swaps, and synonym replacement from GloVe neighbours; text records:
perturbed copies (`perturbed_copies`: word drops, GloVe synonyms, n-gram cuts).
Randomness comes from torch's global generator (the Trainer seeds it), or an explicit
`generator`; `perturbed_copies` is deterministic for its seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dapeng.errors import ConfigError


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


# ----------------------------------------------------------------------------- RandAugment and Cutout
# FixMatch's strong views (Sohn et al. 2020, its "RandAugment with random magnitudes"): each image
# gets `ops` operations drawn from RA_OPS, each at a magnitude drawn uniformly in [0, 1], then a
# Cutout square. Pixels are in [0, 1]; what geometric operations bring in from outside is `fill`.


def _blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + factor · (image - degenerate), per image, clipped to [0, 1]."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (images - degenerate)).clamp(0, 1)


def _factor(m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return 1 + 0.9 * m * sign  # enhancement factors in [0.1, 1.9]


def _grey(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
        return (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
    return images.mean(1, keepdim=True)


def _affine(images: torch.Tensor, theta: torch.Tensor, fill: float) -> torch.Tensor:
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _eye(b: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, dtype=like.dtype, device=like.device).expand(b, 2, 3).clone()  # (B, 2, 3)


def _rotate(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
    angle = m * sign * (30 * math.pi / 180)
    theta = _eye(len(x), x)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    return _affine(x, theta, fill)


def _shear(axis: int) -> Callable[..., torch.Tensor]:
    def shear(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
        theta = _eye(len(x), x)
        theta[:, axis, 1 - axis] = 0.3 * m * sign
        return _affine(x, theta, fill)

    return shear


def _translate(axis: int) -> Callable[..., torch.Tensor]:
    def translate(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
        theta = _eye(len(x), x)
        theta[:, axis, 2] = 0.3 * 2 * m * sign  # up to 30% of the size; grid coordinates span [-1, 1]
        return _affine(x, theta, fill)

    return translate


def _autocontrast(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
    low = x.amin((2, 3), keepdim=True)
    high = x.amax((2, 3), keepdim=True)
    return torch.where(high > low, (x - low) / (high - low).clamp_min(1e-6), x)


def _equalize(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
    """Histogram equalisation of each image and channel over 256 levels."""
    b, c, h, w = x.shape
    levels = (x * 255).round().long().clamp(0, 255).reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=x.dtype, device=x.device).scatter_add_(1, levels, torch.ones_like(x).reshape(b * c, -1))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).amin(1, keepdim=True)
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp_min(1)).clamp(0, 1)
    return lut.gather(1, levels).reshape(b, c, h, w)


def _brightness(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), _factor(m, sign))


def _contrast(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
    return _blend(x, _grey(x).mean((1, 2, 3), keepdim=True).expand_as(x), _factor(m, sign))


def _color(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
    return _blend(x, _grey(x).expand_as(x), _factor(m, sign))  # grey images: no change


def _sharpness(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
    c = x.shape[1]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(c, 1, 3, 3), groups=c)
    return _blend(x, smooth, _factor(m, sign))


def _posterize(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
    bits = (8 - (m * 4).round()).view(-1, 1, 1, 1)  # keep 8 .. 4 bits
    step = 2 ** (8 - bits)
    return torch.floor(x * 255 / step) * step / 255


def _solarize(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
    threshold = (1 - m).view(-1, 1, 1, 1)  # magnitude 0: nothing inverted
    return torch.where(x >= threshold, 1 - x, x)


def _identity(x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor, fill: float) -> torch.Tensor:
    return x


# name → op(images (N, C, H, W) in [0, 1], magnitudes (N,) in [0, 1], signs (N,) ±1, fill) → images
RA_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "identity": _identity, "autocontrast": _autocontrast, "equalize": _equalize, "brightness": _brightness,
    "contrast": _contrast, "color": _color, "sharpness": _sharpness, "posterize": _posterize,
    "solarize": _solarize, "rotate": _rotate, "shear_x": _shear(0), "shear_y": _shear(1),
    "translate_x": _translate(0), "translate_y": _translate(1),
}


def rand_augment(images: torch.Tensor, ops: int = 2, fill: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """`ops` operations of `RA_OPS` per image, each drawn uniformly, at uniform random magnitudes.

    Args:
        images: (B, C, H, W) pixels in [0, 1].
        ops: operations applied to each image, one after another.
        fill: the value geometric operations bring in from outside the image.
        generator: randomness (default: torch's global generator).

    Returns:
        (B, C, H, W) pixels in [0, 1].
    """
    names = list(RA_OPS)
    x = images
    for _ in range(ops):
        pick = torch.randint(0, len(names), (len(x),), generator=generator, device=x.device)
        magnitude = torch.rand(len(x), generator=generator, device=x.device)
        sign = torch.where(torch.rand(len(x), generator=generator, device=x.device) < 0.5, -1.0, 1.0).to(x.dtype)
        out = x.clone()
        for k in pick.unique().tolist():
            rows = pick == k
            out[rows] = RA_OPS[names[k]](x[rows], magnitude[rows].to(x.dtype), sign[rows], fill)
        x = out
    return x


def cutout(images: torch.Tensor, size: float = 0.5, fill: float | torch.Tensor = 0.5,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Blank a square of side `size` × the image's side per image, centred anywhere (DeVries & Taylor
    2017): near a border part of it falls outside."""
    b, _, h, w = images.shape
    side_h, side_w = max(1, round(size * h)), max(1, round(size * w))
    cy = torch.randint(0, h, (b,), generator=generator, device=images.device)
    cx = torch.randint(0, w, (b,), generator=generator, device=images.device)
    ys = torch.arange(h, device=images.device)[None, :]
    xs = torch.arange(w, device=images.device)[None, :]
    in_y = (ys >= (cy - side_h // 2)[:, None]) & (ys < (cy - side_h // 2 + side_h)[:, None])  # (B, H)
    in_x = (xs >= (cx - side_w // 2)[:, None]) & (xs < (cx - side_w // 2 + side_w)[:, None])  # (B, W)
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, H, W)
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    return torch.where(mask, fill_t, images)


# ----------------------------------------------------------------------------- perturbed texts


def perturbed_copies(records: Sequence[dict[str, Any]], copies: int, drop: float = 0.1, synonym: float = 0.1,
                     seed: int = 0, ngram: float = 0.0, key: str = "distill.transfer") -> list[dict[str, Any]]:
    """`copies` perturbed versions of each text record, copy by copy (all records' first copies first).

    Each word is dropped with probability `drop`, else replaced with probability `synonym` by
    one of its GloVe-6B-50d nearest neighbours (cosine ≥ 0.7, among the words of the
    records); then, with probability `ngram`, the copy is cut down to a random run of 1–5 of
    its words. A copy keeps every other field of its record (its label, if any). Deterministic
    for a seed.

    Args:
        key: the config section asking, named by the error.

    Raises:
        ConfigError: the records hold no text.
    """
    from dapeng.data.glove import glove_neighbours

    if any(not isinstance(r.get("text"), str) for r in records):
        raise ConfigError(f"config key {key}: perturbed copies need text records",
                          f"set {key}.copies: 0 for other data")
    split = [r["text"].split() for r in records]
    vocab: dict[str, int] = {}
    for words in split:
        for w in words:
            vocab.setdefault(w.lower(), len(vocab))
    neighbours = glove_neighbours(vocab, len(vocab), 5, 0.7) if synonym else None
    words_of = list(vocab)
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for copy in range(copies):
        for record, words in zip(records, split):
            kept: list[str] = []
            for w, u in zip(words, rng.random(len(words))):
                if u < drop:
                    continue
                if neighbours is not None and u < drop + synonym:
                    options = neighbours[vocab[w.lower()]]
                    options = options[options >= 0]
                    if len(options):
                        w = words_of[int(options[rng.integers(len(options))])]
                kept.append(w)
            kept = kept or words
            if ngram and rng.random() < ngram:  # drawn only when asked: copies without it stay as cached
                n = int(rng.integers(1, 6))
                start = int(rng.integers(0, max(1, len(kept) - n + 1)))
                kept = kept[start : start + n]
            text = " ".join(kept)
            source = record.get("_source")
            out.append({**record, "text": text, **({"_source": f"{source} (copy {copy + 1})"} if source else {})})
    return out
