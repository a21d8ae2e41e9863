"""A seeded batch sampler that can resume mid-epoch, on one process or many.

The order of epoch `e` is a permutation drawn from its own generator seeded with
`(seed, e)`, so it never touches the global RNG (dropout draws stay identical after a
resume) and any epoch's order can be recomputed from two integers.

With `num_replicas` processes (data-parallel ranks) the sampler cuts the same global
batches as one process would and gives each rank its equal slice of every one: N ranks
with per-rank batches of B/N see exactly the items one process sees in its batch of B, in
the same steps, and the resumable position (a global batch index) means the same on any
world size. Every rank gets the same number of batches (ranks that took different
numbers of steps would wait on each other's gradients forever, pytorch#141069): a last
short batch that does not split evenly is padded with items from the start of the
epoch's order (as `torch.utils.data.DistributedSampler` pads), or dropped with `drop_last`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields lists of indices; `set_epoch(e, start=k)` starts epoch `e` at its (global) batch `k`.

    Args:
        size: number of items.
        batch_size: items per global batch (each of `num_replicas` ranks gets `batch_size / num_replicas`).
        shuffle: a fresh seeded permutation each epoch (else the items' order).
        seed: the base seed of every epoch's permutation.
        drop_last: drop a final short batch.
        num_replicas: data-parallel ranks sharing each batch.
        rank: this process's rank among them.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size % num_replicas:
            raise ValueError(f"batch_size={batch_size} does not split over {num_replicas} ranks")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is not in [0, {num_replicas})")
        self.size = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
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
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.num_replicas == 1:
                yield batch
                continue
            short = -len(batch) % self.num_replicas
            batch = batch + [order[i % self.size] for i in range(short)]  # pad evenly, never an empty rank
            per_rank = len(batch) // self.num_replicas
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start}
