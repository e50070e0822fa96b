"""A deterministic, resumable order over a dataset: epochs are permutations keyed on (seed, epoch).

The training data is one endless stream of indices, ``perm(seed, 0) ++ perm(seed, 1) ++ ...``.
Batch k of the stream depends only on (seed, k, batch size), not on the number of processes:
each process takes its contiguous slice of every global micro-batch. Resuming at optimizer step
s means starting the stream at sample position ``s * global_batch`` (a skip costs O(1), not a
replay of the epoch), so a resumed run sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a permutation of range(n) determined by (seed, epoch) alone."""
    # SeedSequence mixes (seed, epoch) into well-separated streams (seed+epoch would collide).
    key = int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(key))


class StreamBatchSampler(Sampler[list[int]]):
    """Endless batches of indices for one process; ``start`` is the global sample position to begin at."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError(f"the dataset is empty (n={n}); nothing to train on")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start < 0:
            raise ValueError(f"bad stream: batch_size={batch_size}, rank={rank}, world_size={world_size}, start={start}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size, self.start = int(rank), int(world_size), int(start)
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k >= epoch - 1}  # keep at most two
            self._cache[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return self._cache[epoch]

    def indices(self, position: int, count: int) -> list[int]:
        """Dataset indices at stream positions [position, position + count)."""
        out: list[torch.Tensor] = []
        while count > 0:
            epoch, offset = divmod(position, self.n)
            take = min(count, self.n - offset)
            out.append(self._perm(epoch)[offset:offset + take])
            position, count = position + take, count - take
        return torch.cat(out).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        position, step = self.start, self.batch_size * self.world_size
        lo = self.rank * self.batch_size
        while True:
            yield self.indices(position, step)[lo:lo + self.batch_size]
            position += step

    def __len__(self) -> int:
        # endless; DataLoader only asks for len() when someone iterates by epoch, which we never do
        raise TypeError("StreamBatchSampler is an endless stream and has no length")
