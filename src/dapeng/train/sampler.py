"""A seeded batch sampler that can resume mid-epoch.

The order of epoch `e` is a permutation drawn from its own generator seeded with
`(seed, e)`, so it never touches the global RNG (dropout draws stay identical after a
resume) and any epoch's order can be recomputed from two integers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields lists of indices; `set_epoch(e, start=k)` starts epoch `e` at its batch `k`.

    Args:
        size: number of items.
        batch_size: items per batch.
        shuffle: a fresh seeded permutation each epoch (else the items' order).
        seed: the base seed of every epoch's permutation.
        drop_last: drop a final short batch.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        self.size = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def order(self, epoch: int) -> list[int]:
        """The item order of `epoch`."""
        if not self.shuffle:
            return list(range(self.size))
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        for b in range(self.start, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start}
