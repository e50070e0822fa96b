"""The trainer's small parts: the resumable data stream and the EMA, against exact expectations."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from diffusion.data_stream import StreamBatchSampler, epoch_permutation
from diffusion.ema import EMA


def take(sampler: StreamBatchSampler, k: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), k))


def test_every_epoch_is_a_permutation_keyed_on_seed_and_epoch() -> None:
    n = 37
    p0, p1 = epoch_permutation(n, seed=3, epoch=0), epoch_permutation(n, seed=3, epoch=1)
    assert sorted(p0.tolist()) == list(range(n)) and sorted(p1.tolist()) == list(range(n))
    assert not torch.equal(p0, p1)
    assert torch.equal(p0, epoch_permutation(n, seed=3, epoch=0))
    assert not torch.equal(p0, epoch_permutation(n, seed=4, epoch=0))


def test_stream_crosses_epochs_and_visits_each_item_once_per_epoch() -> None:
    n, b = 10, 4
    flat = sum(take(StreamBatchSampler(n, b, seed=1), 5), [])  # 20 positions = 2 epochs
    assert flat[:n] == epoch_permutation(n, 1, 0).tolist()
    assert flat[n:] == epoch_permutation(n, 1, 1).tolist()


def test_starting_at_a_position_is_the_same_as_skipping_to_it() -> None:
    n, b = 23, 5
    full = take(StreamBatchSampler(n, b, seed=7), 12)
    resumed = take(StreamBatchSampler(n, b, seed=7, start=7 * b), 5)
    assert resumed == full[7:12]


@pytest.mark.parametrize("world", [2, 3])
def test_process_slices_tile_the_single_process_batches(world: int) -> None:
    n, per_rank = 50, 4
    single = take(StreamBatchSampler(n, per_rank * world, seed=0), 6)
    ranks = [take(StreamBatchSampler(n, per_rank, seed=0, rank=r, world_size=world), 6) for r in range(world)]
    for k in range(6):
        assert sum((ranks[r][k] for r in range(world)), []) == single[k]


def test_stream_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="empty"):
        StreamBatchSampler(0, 4)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        StreamBatchSampler(10, 4, rank=2, world_size=2)


def test_ema_matches_the_closed_form() -> None:
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
    ema = EMA(net, decay=0.9, warmup=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(2.0)
    for _ in range(5):
        ema.update(net)
    # from 0 towards a constant target c: ema_n = c (1 - d^n)
    assert torch.allclose(ema.net.weight, torch.full((2, 3), 1 - 0.9**5))
    assert torch.allclose(ema.net.bias, torch.full((2,), 2 * (1 - 0.9**5)))
    assert not ema.net.weight.requires_grad and not ema.net.training


def test_ema_warmup_forgets_the_initialisation_fast() -> None:
    ema = EMA(nn.Linear(2, 2), decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(1 / 10)  # (1 + 0) / (10 + 0)
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.999
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(2, 2), decay=1.0)
