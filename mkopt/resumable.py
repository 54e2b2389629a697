"""A data order that a resumed or distributed run reproduces exactly, without saving RNG state.

- :class:`EpochBatches` shuffles with a generator seeded from ``(seed, epoch)``, cuts the
  permutation into *global* batches and gives rank ``r`` the ``r``-th contiguous slice of each:
  the global batches do not depend on the number of ranks, and a run resumed after ``b`` batches
  starts at global batch ``b`` (of any world size dividing the global batch).
- :class:`SeededSamples` reseeds torch's RNG from ``(seed, epoch, index)`` around every sample, so
  random augmentations (torchvision's ``RandomResizedCrop``, flips, ...) draw the same numbers
  whatever the worker count, the rank, or where the run was resumed. (Transforms that use Python's
  ``random`` or NumPy instead of torch are not covered.)

Example:
    >>> order = EpochBatches(10, global_batch=4, seed=0, epoch=0, rank=1, world_size=2)
    >>> len(order), [len(b) for b in order]
    (2, [2, 2])
    >>> all(epoch == 0 for batch in order for epoch, _ in batch)
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from .sampling import step_seed
from .streams import stream_id


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """This rank's batches of ``(epoch, index)`` pairs for one epoch, from global batch ``start`` on.

    ``drop_last=True``: the tail that does not fill a global batch is skipped (a different tail
    each epoch, since the permutation changes).

    Example:
        >>> full = [i for b in EpochBatches(8, 4, seed=3, epoch=1) for _, i in b]
        >>> rest = [i for b in EpochBatches(8, 4, seed=3, epoch=1, start=1) for _, i in b]
        >>> rest == full[4:], sorted(full) == list(range(8))
        (True, True)
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not split evenly over {world_size} ranks")
        if num_samples < global_batch:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch}: lower the batch size")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.start, self.shuffle = start, shuffle
        if not 0 <= start <= self.batches_per_epoch:
            raise ValueError(f"start={start} is outside this epoch's {self.batches_per_epoch} batches")

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(step_seed(self.seed, self.epoch, stream_id("data_order")))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        local = self.global_batch // self.world_size
        for b in range(self.start, self.batches_per_epoch):
            first = b * self.global_batch + self.rank * local
            yield [(self.epoch, i) for i in order[first : first + local]]


class SeededSamples(Dataset):
    """Wraps a dataset: item ``(epoch, index)`` is ``dataset[index]`` under torch's RNG seeded for it.

    The global RNG state around the call is saved and restored, so the caller's stream is untouched.

    Example:
        >>> class Noise(Dataset):
        ...     def __len__(self): return 3
        ...     def __getitem__(self, i): return torch.rand(1)
        >>> data = SeededSamples(Noise(), seed=0)
        >>> torch.equal(data[(2, 1)], data[(2, 1)]), torch.equal(data[(2, 1)], data[(3, 1)])
        (True, False)
    """

    def __init__(self, dataset: Sequence[Any] | Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(self.seed, epoch, stream_id("sample", index)))
            return self.dataset[index]


def shard(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Indices ``rank, rank + world_size, ...``: every sample on exactly one rank (for evaluation).

    Example:
        >>> shard(5, 1, 2)
        [1, 3]
    """
    return list(range(rank, num_samples, world_size))
