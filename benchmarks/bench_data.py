"""Training input pipeline throughput vs the per-core decode + augment limit; object store vs disk; the
division of work at a simulated cluster scale.

    python benchmarks/bench_data.py [--workers 1 2] [--batch-size 32] [--repeats 3] [--smoke] [--out FILE]
    python benchmarks/bench_data.py --s3 [--smoke]     # local S3 server vs local disk (data_s3.py)
    python benchmarks/bench_data.py --scale [--baseline REV] [--ranks 512] [--workers 8]  # (data_scale.py)

For ants/bees (photos of many sizes, 224 px crops) and the CIFAR-10 subset (32 px), the images are
written as shards, then timed three ways, side by side in one run:
- limit: one process decodes (PIL) and augments (timm DeiT per-image transform, to uint8 tensors) the
  same image bytes held in memory, one image after the other, with one torch thread: the plain loop the
  target is set against;
- staged limit: the same loop decoding a batch's worth of images, then augmenting them, as the pipeline's
  workers do (each stage's code stays in cache; ~10% faster at 32 px): the stricter reference, against
  which the ratio is the pipeline's own overhead (reading, shuffling, batching, shipping);
- pipeline: ``build_train_loader(...).raw_batches()`` (read shards, shuffle, decode, augment, batch, ship
  to the main process) with 1 and 2 DataLoader workers, timed from the loader's start to the epoch's end,
  less the time of an epoch with no images left (worker start-up and shut-down).
Both produce the same images: augmented uint8 (3, S, S), each with the same random draws; the pipeline
has also read them from tars, shuffled and batched them, and handed them to the main process. The batch
half of the recipe (normalise, random erasing, Mixup/CutMix) runs on the training device, outside both;
``finish`` gives its CPU cost per image on this CPU, for reference.
``per worker`` = best pipeline images/s / (workers x best limit images/s) over ``--repeats`` alternating
timings; the target is >= 0.9 for one worker. ``runs`` lists each repeat's own ratio (the noise). With
more workers than free cores the per-worker figure drops for lack of cores, not of the pipeline. ``cpu
eff.`` compares CPU seconds per image (the limit's over the pipeline's, main process and workers
together, less the CPU of the no-image epoch), ``workers' cpu eff.`` the same for the workers alone: the
pipeline's own overhead, less sensitive than wall clock to other load on the machine.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import write_result  # noqa: E402

from defocus_scale.data.config import DataConfig  # noqa: E402
from defocus_scale.data.loader import _DECODED_PIXELS, _derived_seed, build_train_loader  # noqa: E402
from defocus_scale.data.stream import iter_shard, resolve_shards  # noqa: E402
from defocus_scale.data.transforms import BatchFinisher, seed_global_rngs, train_transform  # noqa: E402

PIPELINE_SEED = 0
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {  # name: (image folder, classes, crop size)
    "ants/bees": (REAL_DATA / "hymenoptera" / "train", 2, 224),
    "cifar10": (REAL_DATA / "cifar10-subset" / "train", 10, 32),
}


def _write_shards(folder: Path, out: Path, limit: int | None) -> None:
    """The project's shard writer when available, else plain webdataset.TarWriter (same format)."""
    try:
        from defocus_scale.data.make_shards import make_shards
    except ImportError:
        make_shards = None
    if make_shards is not None and limit is None:
        make_shards(folder, out, samples_per_shard=500, workers=1, progress=False)
        return
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = sorted(f for f in folder.glob("*/*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = files[:limit] if limit else files
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(files), 500):
        with wds.TarWriter(str(out / f"train-{start // 500:06d}.tar")) as writer:
            for i, path in enumerate(files[start : start + 500], start):
                extension = "png" if path.suffix.lower() == ".png" else "jpg"
                writer.write({"__key__": f"{i:06d}", extension: path.read_bytes(),
                              "cls": classes.index(path.parent.name)})


def _in_memory(shard_dir: Path) -> list[tuple[str, bytes]]:
    images = []
    for shard in resolve_shards(shard_dir):
        for _, raw in iter_shard(shard.url):
            images.append((raw["__key__"], next(raw[e] for e in ("jpg", "jpeg", "png", "webp") if e in raw)))
    return images


def _cpu_seconds(workers_only: bool = False) -> float:
    """CPU time of this process plus (or only, ``workers_only``) that of its exited children: the
    DataLoader workers, once joined."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (0.0 if workers_only else time.process_time()) + children.ru_utime + children.ru_stime


def _limit_rate(
    images: list[tuple[str, bytes]], cfg: DataConfig, staged: bool = False
) -> tuple[float, float, list[torch.Tensor]]:
    """(images/s, CPU s/image, a few batches of the outputs) of decode + augment to uint8 tensors, in this
    process, one thread, from memory. Batching the outputs is the pipeline's work, not counted here.

    Plain: one image after the other. ``staged``: decode a batch's worth of images (at most
    ``_DECODED_PIXELS`` at once), then augment them, as the pipeline's workers do; each stage's code stays
    in cache: the stricter reference.
    Each image gets the random draws the pipeline gives it (same per-sample seed), so both do the same
    work: crops of photos up to 2592x1944 px differ a lot in resize cost.
    """
    transform = train_transform(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kept: collections.deque[torch.Tensor] = collections.deque(maxlen=4 * cfg.batch_size)
    decoded: list[tuple[str, Image.Image]] = []

    def augment_decoded() -> None:
        for key, rgb in decoded:
            seed_global_rngs(_derived_seed(PIPELINE_SEED, 0, key, 0))
            kept.append(transform(rgb))
        decoded.clear()

    try:
        start, cpu, pixels = time.perf_counter(), _cpu_seconds(), 0
        for index, (key, data) in enumerate(images):
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
            if decoded and (index % cfg.batch_size == 0 or pixels + rgb.width * rgb.height > _DECODED_PIXELS):
                augment_decoded()
                pixels = 0
            decoded.append((key, rgb))
            pixels += rgb.width * rgb.height
            if not staged:
                augment_decoded()
        augment_decoded()
        rate, cpu = len(images) / (time.perf_counter() - start), (_cpu_seconds() - cpu) / len(images)
    finally:
        torch.set_num_threads(threads)
    outputs = list(kept)
    batches = [torch.stack(outputs[i : i + cfg.batch_size]) for i in range(0, len(outputs), cfg.batch_size)]
    return rate, cpu, [b for b in batches if len(b) == cfg.batch_size]


def _pipeline_rate(cfg: DataConfig) -> tuple[float, float, float]:
    """(images/s, CPU s/image of all processes, of the workers alone) of an epoch, each less that of an
    epoch with no images left (starting and stopping the workers)."""
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=PIPELINE_SEED)

    def epoch() -> tuple[int, float, float, float]:
        start, cpu, worker_cpu = time.perf_counter(), _cpu_seconds(), _cpu_seconds(workers_only=True)
        images = sum(len(batch) for batch, _, _ in loader.raw_batches())
        return (images, time.perf_counter() - start, _cpu_seconds() - cpu,
                _cpu_seconds(workers_only=True) - worker_cpu)

    images, wall, cpu, worker_cpu = epoch()
    idle_images, idle_wall, idle_cpu, idle_worker_cpu = epoch()  # the spent epoch
    assert idle_images == 0
    return images / (wall - idle_wall), (cpu - idle_cpu) / images, (worker_cpu - idle_worker_cpu) / images


def _finish_cpu_seconds(batches: list[torch.Tensor], cfg: DataConfig) -> float:
    """CPU s/image of the batch half of the recipe (normalise, erase, mix) on CPU, one thread."""
    finisher = BatchFinisher(cfg, train=True)
    labels = torch.zeros(cfg.batch_size, dtype=torch.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = _cpu_seconds()
        for i, batch in enumerate(batches):
            finisher(batch, labels, seed=i)
        return (_cpu_seconds() - cpu) / (len(batches) * cfg.batch_size)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many alternating timings")
    parser.add_argument("--smoke", action="store_true", help="few images, for a quick check")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--s3", action="store_true", help="only the object-store rows (data_s3.py)")
    parser.add_argument("--scale", action="store_true", help="only the simulated-scale rows (data_scale.py)")
    parser.add_argument("--baseline", default="b8527a8", help="--scale: the commit whose stream is 'before'")
    parser.add_argument("--ranks", type=int, default=512, help="--scale: simulated ranks")
    args = parser.parse_args()
    if args.s3:
        return _s3_main(args)
    if args.scale:
        return _scale_main(args)
    if not REAL_DATA.is_dir():
        sys.exit(f"real data folder {REAL_DATA} is absent; this benchmark needs it")

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (folder, num_classes, size) in DATASETS.items():
            shard_dir = Path(scratch) / name.replace("/", "_")
            _write_shards(folder, shard_dir, limit=64 if args.smoke else None)
            cfg = DataConfig(source=str(shard_dir), num_classes=num_classes, image_size=size,
                             batch_size=8 if args.smoke else args.batch_size,
                             drop_last=False)  # every image read is delivered, on both sides
            images = _in_memory(shard_dir)
            limits, staged, pipelines, last_batches = [], [], {w: [] for w in args.workers}, []
            for _ in range(args.repeats):  # alternate, so that outside load hits all alike
                rate, cpu, last_batches = _limit_rate(images, cfg)
                limits.append((rate, cpu))
                staged.append(_limit_rate(images, cfg, staged=True)[:2])
                for workers in args.workers:
                    cfg.workers = workers
                    pipelines[workers].append(_pipeline_rate(cfg))
            limit = max(r for r, _ in limits)
            limit_cpu = min(c for _, c in limits)
            staged_limit, staged_cpu = max(r for r, _ in staged), min(c for _, c in staged)
            finish_cpu = _finish_cpu_seconds(last_batches, cfg)
            for workers, runs in pipelines.items():
                rate = max(r for r, _, _ in runs)
                cpu = min(c for _, c, _ in runs)
                worker_cpu = min(c for _, _, c in runs)
                run_ratios = [p[0] / (workers * lim[0]) for p, lim in zip(runs, limits)]
                staged_ratios = [p[0] / (workers * lim[0]) for p, lim in zip(runs, staged)]
                rows.append({"dataset": name, "image_size": size, "images": len(images), "workers": workers,
                             "limit_images_per_s": limit, "pipeline_images_per_s": rate,
                             "per_worker_ratio": rate / (workers * limit),
                             "per_worker_ratio_runs": run_ratios,
                             "staged_limit_images_per_s": staged_limit,
                             "per_worker_ratio_vs_staged": rate / (workers * staged_limit),
                             "per_worker_ratio_vs_staged_runs": staged_ratios,
                             "staged_limit_cpu_s_per_image": staged_cpu,
                             "worker_cpu_efficiency_vs_staged": staged_cpu / worker_cpu,
                             "limit_cpu_s_per_image": limit_cpu, "pipeline_cpu_s_per_image": cpu,
                             "cpu_efficiency": limit_cpu / cpu, "worker_cpu_s_per_image": worker_cpu,
                             "worker_cpu_efficiency": limit_cpu / worker_cpu,
                             "finish_cpu_s_per_image": finish_cpu})

    table = Table(title="Training input pipeline vs per-core decode+augment limit (images/s)")
    columns = ("dataset", "px", "images", "workers", "limit (1 core)", "pipeline", "per worker", "runs",
               "staged limit", "per worker vs staged", "cpu eff.", "workers' cpu eff.", "finish (cpu)")
    for column in columns:
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for r in rows:
        table.add_row(r["dataset"], str(r["image_size"]), str(r["images"]), str(r["workers"]),
                      f"{r['limit_images_per_s']:.0f}", f"{r['pipeline_images_per_s']:.0f}",
                      f"{r['per_worker_ratio']:.2f}x",
                      " ".join(f"{x:.2f}" for x in r["per_worker_ratio_runs"]),
                      f"{r['staged_limit_images_per_s']:.0f}", f"{r['per_worker_ratio_vs_staged']:.2f}x",
                      f"{r['cpu_efficiency']:.2f}x", f"{r['worker_cpu_efficiency']:.2f}x",
                      f"{r['finish_cpu_s_per_image'] * 1e6:.0f} us/img")
    Console(width=200).print(table)
    load = dict(zip(("1min", "5min", "15min"), os.getloadavg()))
    payload = {"smoke": args.smoke, "batch_size": args.batch_size, "repeats": args.repeats,
               "load_average": load, "versions": _versions(), "rows": rows}
    path = write_result("bench_data", payload, args.out)
    print(f"wrote {path}")


def _s3_main(args: argparse.Namespace) -> None:
    import data_s3

    rows = data_s3.run(smoke=args.smoke)
    table = Table(title="Shards from a local S3 server (moto, loopback) vs local disk, 1 process")
    for column in ("storage", "px", "images/s", "vs disk", "bytes read / sample", "shard bytes / sample",
                   "slice: bytes / sample, seek", "slice: skip"):
        table.add_column(column, justify="left" if column == "storage" else "right")
    for r in rows:
        table.add_row(r["storage"], str(r["image_size"]), f"{r['images_per_s']:.0f}",
                      f"{r['images_per_s_vs_local']:.2f}x", f"{r['bytes_per_sample']:.0f}",
                      f"{r['shard_bytes_per_sample']:.0f}", f"{r['slice_bytes_per_sample_seek']:.0f}",
                      f"{r['slice_bytes_per_sample_skip']:.0f}")
    Console(width=200).print(table)
    path = write_result("bench_data_s3", {"smoke": args.smoke, "rows": rows}, args.out)
    print(f"wrote {path}")


def _scale_main(args: argparse.Namespace) -> None:
    import data_scale

    workers = args.workers[0] if args.workers != [1, 2] else 8
    rows = data_scale.run(args.baseline, ranks=args.ranks, workers=workers)
    table = Table(title=f"Work division at {args.ranks} ranks x {workers} workers, ImageNet-1k in class "
                        "order (simulated; micro-batch 2)")
    for column in ("plan", "shards", "idle workers", "rank spread", "dropped", "bytes read / needed",
                   "GPU window entropy", "(random)", "global batch entropy", "(random)"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for r in rows:
        table.add_row(r["label"], str(r["shards"]), str(r["idle_workers"]), str(r["rank_spread"]),
                      f"{r['dropped_by_lockstep']} ({100 * r['dropped_fraction']:.1f}%)",
                      f"{r['bytes_read_per_needed']:.2f}", f"{r['window_entropy_bits']:.2f}",
                      f"{r['window_entropy_random_bits']:.2f}", f"{r['global_batch_entropy_bits']:.2f}",
                      f"{r['global_batch_entropy_random_bits']:.2f}")
    Console(width=200).print(table)
    payload = {"baseline": args.baseline, "ranks": args.ranks, "workers": workers, "rows": rows}
    path = write_result("bench_data_scale", payload, args.out)
    print(f"wrote {path}")


def _versions() -> dict[str, str]:
    import PIL
    import timm

    return {"timm": timm.__version__, "webdataset": wds.__version__, "pillow": PIL.__version__}


if __name__ == "__main__":
    main()
