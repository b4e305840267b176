"""The stream's division of work at a simulated cluster scale, before and after (``bench_data.py --scale``).

No shard is read: the stream's own planning code runs for every rank of a simulated world (512 ranks x
8 DataLoader workers by default), over a stand-in of ImageNet-1k (1,281,167 samples, 1,000 classes)
written **in class order** into 1,000 or 1,024 shards, with and without a manifest. Its readers run too,
on fake shards that yield labels only (``iter_shard`` replaced), so buffering and interleaving are the
real code's. The baseline is the stream module of an earlier commit (``--baseline REV``, loaded from git).

Figures per configuration:
- idle workers: DataLoader workers given no sample;
- rank spread: max - min samples per rank; ``dropped``: samples the lockstep end of the epoch leaves
  unread (every rank stops at the shortest rank's batch count);
- bytes read / bytes needed: a worker reading a slice of a shard reads from the shard's start without
  byte offsets (seek, don't skip), from the slice's start with them (the manifest's ``offsets``);
- label entropy (bits): of one GPU's samples over 64 steps (128 samples at micro-batch 2), and of a
  global batch (every rank's micro-batch of one step, 1,024 samples), beside that of random draws.
Without a manifest the trainer now indexes the shards at the start (``after, no manifest``: the same
plan as with one, plus one header-only pass over the data, ~``index bytes`` read in all).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES, CLASSES = 1_281_167, 1000
MEAN_SAMPLE_BYTES = 110_000  # ImageNet-1k's JPEGs average ~110 kB
WINDOW_STEPS = 64


def _module_at(revision: str | None) -> types.ModuleType:
    """``defocus_scale.data.stream`` now, or as it was at ``revision`` (its relative imports resolve to
    today's package, which still provides what the old module used)."""
    import defocus_scale.data.stream as current

    if revision is None:
        return current
    source = subprocess.run(["git", "show", f"{revision}:defocus_scale/data/stream.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    spec = importlib.util.spec_from_loader(f"defocus_scale.data._stream_{revision}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "defocus_scale.data"
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"stream.py@{revision}", "exec"), module.__dict__)  # noqa: S102 - our own file
    return module


def _dataset(shards: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shard sizes, labels in class order, each sample's bytes (lognormal), each shard's first sample."""
    rng = np.random.default_rng(seed)
    sizes = np.diff(np.arange(shards + 1) * SAMPLES // shards)
    labels = np.sort(rng.integers(0, CLASSES, SAMPLES))
    sample_bytes = rng.lognormal(np.log(MEAN_SAMPLE_BYTES) - 0.18, 0.6, SAMPLES).astype(np.int64) + 1024
    return sizes, labels, sample_bytes, np.concatenate([[0], np.cumsum(sizes)])


def _entropy(labels: np.ndarray) -> float:
    counts = np.bincount(labels, minlength=CLASSES).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def simulate(module: types.ModuleType, *, shards: int, manifest: bool, ranks: int, workers: int,
             batch: int, label: str, entropy_ranks: int = 64) -> dict[str, Any]:  # fmt: skip
    sizes, labels, sample_bytes, starts = _dataset(shards)
    fake = [module.Shard(f"mem://s-{i:06d}.tar", int(sizes[i]) if manifest else None)
            for i in range(shards)]  # fmt: skip

    def fake_iter_shard(url: str, start: int = 0, stop: int | None = None, picks=None, **_: Any) -> Iterator:
        shard = int(url[-10:-4])
        stop = int(sizes[shard]) if stop is None else stop
        wanted = range(start, stop) if picks is None else sorted(picks)
        for index in wanted:
            yield index, {"__key__": f"{shard}-{index}", "cls": b"%d" % labels[starts[shard] + index]}

    saved = module.resolve_shards, module.iter_shard
    module.resolve_shards, module.iter_shard = (lambda source: fake), fake_iter_shard
    try:
        per_worker, needed_bytes, read_bytes, streams = [], 0, 0, {}
        observed = set(np.linspace(0, ranks - 1, min(entropy_ranks, ranks)).astype(int).tolist())
        for rank in range(ranks):
            kwargs = dict(rank=rank, world_size=ranks, seed=0, decode=False, num_substreams=workers,
                          shuffle_buffer=1000)  # fmt: skip
            if "batch_size" in module.ShardStream.__init__.__code__.co_varnames:
                kwargs.update(batch_size=batch, open_shards=8)
            stream = module.ShardStream("simulated", **kwargs)
            counts = []
            for i in range(workers):
                units = [module.WorkUnit.from_json(u) for u in stream.substream_state(i)["pending"]]
                count = 0
                for u in units:
                    stop = u.stop if u.stop is not None else int(sizes[u.shard])
                    count += stop - u.start
                    base = starts[u.shard]
                    needed_bytes += int(sample_bytes[base + u.start: base + stop].sum())
                    seek = manifest and "after" in label  # offsets exist only in the new manifests
                    first = u.start if seek else 0
                    read_bytes += int(sample_bytes[base + first: base + stop].sum())
                counts.append(count)
            per_worker.append(counts)
            if rank in observed:
                streams[rank] = stream
        per_worker = np.array(per_worker)
        per_rank = per_worker.sum(axis=1)
        rank_batches = (per_worker // batch).sum(axis=1)
        dropped = int(((rank_batches - rank_batches.min()) * batch).sum() + (per_worker % batch).sum())
        window, global_steps = [], []
        for stream in streams.values():
            readers = [iter(stream.reader(i)) for i in range(workers)]
            samples = []
            for step in range(WINDOW_STEPS):  # the DataLoader takes batches from its workers in turn
                worker = readers[step % workers]
                samples.append([int(raw["cls"]) for raw in _take(worker, batch)])
            window.append(_entropy(np.array([s for step in samples for s in step], dtype=np.int64)))
            global_steps.append(samples)
        first_steps = [np.array([s for rank in global_steps for s in rank[step]], dtype=np.int64)
                       for step in range(min(8, WINDOW_STEPS))]  # fmt: skip
        scale = ranks / max(1, len(streams))  # a global batch from the observed ranks, scaled up
        rng = np.random.default_rng(1)
        random_window = np.mean([_entropy(rng.choice(labels, WINDOW_STEPS * batch)) for _ in range(20)])
        random_global = np.mean([_entropy(rng.choice(labels, len(first_steps[0]))) for _ in range(20)])
    finally:
        module.resolve_shards, module.iter_shard = saved
    return {
        "label": label, "shards": shards, "manifest": manifest, "ranks": ranks, "workers": workers,
        "micro_batch": batch, "idle_workers": int((per_worker == 0).sum()),
        "samples_per_rank_min": int(per_rank.min()), "samples_per_rank_max": int(per_rank.max()),
        "rank_spread": int(per_rank.max() - per_rank.min()), "dropped_by_lockstep": dropped,
        "dropped_fraction": dropped / SAMPLES, "bytes_read_per_needed": read_bytes / needed_bytes,
        "window_entropy_bits": float(np.mean(window)), "window_entropy_random_bits": float(random_window),
        "global_batch_entropy_bits": float(np.mean([_entropy(s) for s in first_steps])),
        "global_batch_entropy_random_bits": float(random_global), "global_batch_ranks_observed": len(streams),
        "global_batch_scale": scale,
    }  # fmt: skip


def _take(iterator: Iterator[dict], n: int) -> list[dict]:
    out = []
    for raw in iterator:
        out.append(raw)
        if len(out) == n:
            break
    return out


def run(baseline: str, *, ranks: int = 512, workers: int = 8, batch: int = 2,
        shard_counts: tuple[int, ...] = (1000, 1024)) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for revision, when in ((baseline, "before"), (None, "after")):
        module = _module_at(revision)
        for shards in shard_counts:
            for manifest in (True, False):
                if when == "after" and not manifest:
                    # the trainer indexes shards without a manifest first: the plan is the manifest's
                    row = simulate(module, shards=shards, manifest=True, ranks=ranks, workers=workers,
                                   batch=batch, label="after, no manifest (indexed at start)")  # fmt: skip
                    row["manifest"] = False
                else:
                    label = f"{when}, {'manifest' if manifest else 'no manifest'}"
                    row = simulate(module, shards=shards, manifest=manifest, ranks=ranks, workers=workers,
                                   batch=batch, label=label)  # fmt: skip
                rows.append(row)
                print(f"  {row['label']}, {shards} shards: idle {row['idle_workers']}, "
                      f"spread {row['rank_spread']}, window entropy {row['window_entropy_bits']:.2f}",
                      file=sys.stderr)
    return rows
