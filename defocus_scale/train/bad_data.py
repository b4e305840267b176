"""Bad input data counted over all ranks and held to ``data.max_bad_fraction``.

Each rank's train loader counts what it skipped this epoch: shards that were missing or corrupt (by URL)
and samples that did not decode, and the samples it read. A rank sees only its own share of the shards,
so a per-rank limit lets a wide outage through: at 512 ranks a storage outage that takes 30% of the
shards costs each rank a couple of them, far under any fraction of the whole list, and the run would
train on what is left without a word. The trainer therefore combines every rank's figures
(:func:`gather_bad_data`) at each logging read-back and before each checkpoint, and holds the global
ones to the limit (:func:`check_bad_data`). The combined figures are the same on every rank, so every
rank stops at the same step with the same message (no rank is left waiting in a collective).

Cost per boundary: one all-reduce of five integers (and its host sync, at a boundary that syncs anyway);
the URL lists are gathered (``all_gather_object``) only when some rank has a bad shard. A union of the
URLs, not a sum of counts: after a change of world size every rank carries the old run's bad shards,
and a shard cut between two ranks can fail on both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from defocus_scale.data.stream import ShardReadError

MIN_SAMPLES = 100  # samples read (all ranks) before the fraction of undecodable ones is held to the limit
URLS_SHOWN = 5  # bad shard URLs named in the error message
URLS_KEPT = 100  # bad shard URLs kept in the run summary


@dataclass(frozen=True)
class BadData:
    """One epoch's bad data so far, over all ranks."""

    bad_shards: tuple[str, ...] = ()  # URLs of missing or corrupt shards, sorted (the union over ranks)
    bad_samples: int = 0  # samples that did not decode (summed over ranks)
    delivered: int = 0  # samples read, undecodable ones included (summed over ranks)
    num_shards: int = 0  # shards of the source (0: not known)
    reporting: int = 0  # ranks whose loader reports figures (0: none does; nothing is logged or checked)

    def metrics(self) -> dict[str, float]:
        """The step-table figures (none when no loader reports)."""
        if not self.reporting:
            return {}
        return {"data/bad_shards": float(len(self.bad_shards)), "data/bad_samples": float(self.bad_samples)}

    def summary(self) -> dict[str, Any]:
        """The run summary's fields: the last combined figures (of the epoch the run ended in); none when
        no loader reports."""
        if not self.reporting:
            return {}
        return {
            "data/bad_shards": len(self.bad_shards), "data/bad_samples": self.bad_samples,
            "data/samples_delivered": self.delivered,
            "data/bad_shard_urls": list(self.bad_shards[:URLS_KEPT]),
        }  # fmt: skip


def rank_figures(loader: Any) -> dict[str, Any] | None:
    """This rank's figures from its loader's ``stats()``; None for a loader without one."""
    stats = getattr(loader, "stats", None)
    if not callable(stats):
        return None
    figures = stats()
    return {
        "bad_shards": sorted(figures.get("bad_shards", ())),
        "bad_samples": int(figures.get("bad_samples", 0)),
        "delivered": int(figures.get("delivered", 0)),
        "num_shards": int(figures.get("num_shards", 0)),
    }


def combine_bad_data(ranks: Sequence[Mapping[str, Any] | None]) -> BadData:
    """Every rank's figures (as :func:`rank_figures` gives them; None for a rank without) in one: the
    union of the bad shard URLs, the sums of the sample counts."""
    present = [r for r in ranks if r is not None]
    return BadData(
        bad_shards=tuple(sorted({url for r in present for url in r["bad_shards"]})),
        bad_samples=sum(int(r["bad_samples"]) for r in present),
        delivered=sum(int(r["delivered"]) for r in present),
        num_shards=max((int(r["num_shards"]) for r in present), default=0),
        reporting=len(present),
    )


def gather_bad_data(loader: Any, world_size: int, device: torch.device) -> BadData:
    """All ranks' figures combined: a collective, to be called on every rank at the same point. Without a
    process group (or in a world of one) this rank's figures alone."""
    own = rank_figures(loader)
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return combine_bad_data([own])
    mine = own or {"bad_shards": [], "bad_samples": 0, "delivered": 0, "num_shards": 0}
    counts = torch.tensor(
        [int(own is not None), len(mine["bad_shards"]), mine["bad_samples"], mine["delivered"],
         mine["num_shards"]], dtype=torch.int64, device=device,
    )  # fmt: skip
    dist.all_reduce(counts)
    reporting, any_bad, bad_samples, delivered, num_shards = (int(c) for c in counts.tolist())
    urls: set[str] = set()
    if any_bad:  # the sum decides, so every rank gathers or none does
        gathered: list[list[str] | None] = [None] * world_size
        dist.all_gather_object(gathered, mine["bad_shards"])
        urls = {url for part in gathered for url in (part or [])}
    # Every rank reads the same source: the mean over the reporting ranks is its shard count, and every
    # rank decides on the same numbers.
    return BadData(tuple(sorted(urls)), bad_samples, delivered, num_shards // max(reporting, 1), reporting)


def check_bad_data(
    total: BadData, max_bad_fraction: float, *, step: int, epoch: int, world_size: int,
    min_samples: int = MIN_SAMPLES,
) -> None:  # fmt: skip
    """Raise :class:`ShardReadError` (one line) when the global figures exceed ``data.max_bad_fraction``:
    more bad shards than that fraction of the source's shards, or -- once ``min_samples`` samples have
    been read -- more undecodable samples than that fraction of the samples read."""
    where = f"step {step}, epoch {epoch}, over all {world_size} ranks"
    bad = total.bad_shards
    if total.num_shards and len(bad) > max_bad_fraction * total.num_shards:
        more = len(bad) - URLS_SHOWN
        shown = ", ".join(bad[:URLS_SHOWN]) + (f" and {more} more" if more > 0 else "")
        raise ShardReadError(
            f"{where}: {len(bad)} of {total.num_shards} shards ({len(bad) / total.num_shards:.1%}) are "
            f"missing or corrupt, more than data.max_bad_fraction={max_bad_fraction} allows: {shown}"
        )
    if total.delivered >= max(min_samples, 1) and total.bad_samples > max_bad_fraction * total.delivered:
        raise ShardReadError(
            f"{where}: {total.bad_samples} of {total.delivered} samples read "
            f"({total.bad_samples / total.delivered:.1%}) did not decode, more than "
            f"data.max_bad_fraction={max_bad_fraction} allows"
        )
