"""deal_work: equal shares of samples for every rank and worker, batch-aligned, from many shards."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from defocus_scale.data.work import WorkUnit, deal_work, remaining_units, upgrade_substream, worker_quotas


def _shards(count: int, mean: int, seed: int = 0) -> list[WorkUnit]:
    sizes = np.random.default_rng(seed).integers(mean // 2, mean * 3 // 2, count)
    return [WorkUnit(i, 0, int(size)) for i, size in enumerate(sizes)]


def _samples(units: list[WorkUnit]) -> list[tuple[int, int]]:
    return [(u.shard, i) for u in units for i in (u.picks if u.picks is not None else range(u.start, u.stop))]


@pytest.mark.parametrize(("shards", "ranks", "workers"),
                         [(1000, 512, 8), (1024, 512, 8), (7, 3, 2), (1, 2, 3)])
def test_every_worker_gets_an_equal_batch_aligned_share(shards: int, ranks: int, workers: int) -> None:
    units = _shards(shards, 1250 if shards > 100 else 9)
    total = sum(u.size for u in units)
    align = 2
    per_rank, batches = [], []
    for rank in range(ranks):
        mine = deal_work(units, ranks=ranks, workers=workers, rank=rank, slices=8, align=align)
        counts = [sum(u.size for u in worker) for worker in mine]
        assert all(c % align == 0 for c in counts[:-1])  # whole batches but the last worker's
        if total >= ranks * workers * align:
            assert min(counts) > 0  # no idle worker
        per_rank.append(sum(counts))
        batches.append(sum(c // align for c in counts))
    assert sum(per_rank) == total and max(per_rank) - min(per_rank) <= 1
    assert max(batches) - min(batches) <= 1


def test_the_deal_covers_every_sample_once_and_mixes_shards() -> None:
    units = _shards(100, 40, seed=3)
    ranks, workers, slices = 16, 4, 8
    seen: Counter = Counter()
    for rank in range(ranks):
        for worker in deal_work(units, ranks=ranks, workers=workers, rank=rank, slices=slices, align=3):
            seen.update(_samples(worker))
            # 4000 samples / 64 workers: ~62 each, in 8 slices 500 samples apart -> 8 different shards
            assert len({u.shard for u in worker}) >= slices
            firsts = {u.shard for u in worker[:slices]}
            assert len(firsts) == slices  # a reader opening the first 8 units interleaves 8 shards
    assert set(seen.values()) == {1} and len(seen) == sum(u.size for u in units)


def test_quotas_and_picks_units_keep_their_views() -> None:
    quotas = worker_quotas(103, 2, 3, align=4)
    assert quotas.sum() == 103 and abs(quotas[0].sum() - quotas[1].sum()) <= 1
    assert all(q % 4 == 0 for q in quotas[:, :-1].reshape(-1))
    picks = WorkUnit(5, 2, 9, (2, 4, 8), (1, 0, 2))
    assert picks.views_left(3) == 9 - 3 and picks.slice(1, 3) == WorkUnit(5, 4, 9, (4, 8), (0, 2))
    assert picks.after(3) == WorkUnit(5, 4, 9, (4, 8), (0, 2)) and picks.view_of(8) == 2
    dealt = deal_work([picks, WorkUnit(6, 0, 4)], ranks=1, workers=2, rank=0)
    expected = [(5, 2), (5, 4), (5, 8)] + [(6, i) for i in range(4)]
    assert sorted(_samples([u for w in dealt for u in w])) == expected
    assert {u.views for w in dealt for u in w if u.shard == 5} <= {(1, 0, 2), (1,), (0, 2), (1, 0), (2,)}


def test_unknown_sizes_are_dealt_whole_and_old_states_upgrade() -> None:
    units = [WorkUnit(i, 0, None) for i in range(5)]
    dealt = [deal_work(units, ranks=2, workers=2, rank=r) for r in range(2)]
    assert sorted(u.shard for r in dealt for w in r for u in w) == list(range(5))
    old = {"pending": [[1, 0, 5, None]], "open": [[2, 0, 9, None, 4]], "buffered": [[2, 1], [2, 3]],
           "rng": {}, "delivered": 3, "bad_shards": [], "bad_samples": 0}
    units = remaining_units(upgrade_substream(old))
    assert units == [WorkUnit(2, 1, 4, (1, 3)), WorkUnit(2, 4, 9), WorkUnit(1, 0, 5)]
