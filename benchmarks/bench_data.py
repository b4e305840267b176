"""Training input pipeline throughput vs the per-core decode + augment limit.

    python benchmarks/bench_data.py [--workers 1 2] [--batch-size 32] [--repeats 1] [--smoke] [--out FILE]

For ants/bees (photos of many sizes, 224 px crops) and the CIFAR-10 subset (32 px), the images are
written as shards, then timed two ways, side by side in one run:
- limit: one process decodes (PIL) and augments (timm DeiT train transform) the same image bytes held in
  memory, one image after the other, with one torch thread: the most one core can do;
- pipeline: ``build_train_loader`` (read shards, shuffle, decode, augment, collate, Mixup/CutMix) with
  1 and 2 DataLoader workers, counted from the first batch on (worker start-up excluded).
``per worker`` = pipeline images/s / (workers x limit); the target is >= 0.9 for one worker. With more
workers than free cores the per-worker figure drops for lack of cores, not of the pipeline. As wall
clock suffers from other load on the machine, ``cpu eff.`` also compares CPU seconds per image (the
limit loop's over the pipeline's, main process and workers together, less the CPU of starting and
stopping the workers, measured on the spent epoch): the pipeline's own steady-state overhead.
Limit and pipeline timings alternate, ``--repeats`` times; medians are reported.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
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
from defocus_scale.data.loader import _derived_seed, _seed_global_rngs, build_train_loader  # noqa: E402
from defocus_scale.data.stream import iter_shard, resolve_shards  # noqa: E402
from defocus_scale.data.transforms import train_transform  # noqa: E402

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


def _cpu_seconds() -> float:
    """This process's CPU time plus that of its exited children (the DataLoader workers, once joined)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _limit_rate(images: list[tuple[str, bytes]], cfg: DataConfig) -> tuple[float, float]:
    """(images/s, CPU s/image) of decode + augment in this process, one thread, from memory.

    Each image gets the random draws the pipeline gives it (same per-sample seed), so both do the same
    work: crops of photos up to 2592x1944 px differ a lot in resize cost.
    """
    transform = train_transform(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, cpu = time.perf_counter(), _cpu_seconds()
        for key, data in images:
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
            _seed_global_rngs(_derived_seed(PIPELINE_SEED, 0, key, 0))
            transform(rgb)
        return len(images) / (time.perf_counter() - start), (_cpu_seconds() - cpu) / len(images)
    finally:
        torch.set_num_threads(threads)


def _pipeline_rate(cfg: DataConfig) -> tuple[float, float]:
    """(images/s from the first batch to the end of the epoch, CPU s/image less worker start-up)."""
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=PIPELINE_SEED)
    cpu = _cpu_seconds()
    images, timed, start = 0, 0, None
    for batch, _ in loader:
        images += len(batch)
        if start is None:
            start = time.perf_counter()
        else:
            timed += len(batch)
    rate = timed / (time.perf_counter() - start)
    epoch_cpu = _cpu_seconds() - cpu
    cpu = _cpu_seconds()
    assert list(loader) == []  # the spent epoch: starting and stopping the workers, no images
    return rate, (epoch_cpu - (_cpu_seconds() - cpu)) / images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="median over this many timings")
    parser.add_argument("--smoke", action="store_true", help="few images, for a quick check")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not REAL_DATA.is_dir():
        sys.exit(f"real data folder {REAL_DATA} is absent; this benchmark needs it")

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (folder, num_classes, size) in DATASETS.items():
            shard_dir = Path(scratch) / name.replace("/", "_")
            _write_shards(folder, shard_dir, limit=64 if args.smoke else None)
            cfg = DataConfig(source=str(shard_dir), num_classes=num_classes, image_size=size,
                             batch_size=8 if args.smoke else args.batch_size, drop_last=True)
            images = _in_memory(shard_dir)
            limits, pipelines = [], {w: [] for w in args.workers}
            for _ in range(args.repeats):  # alternate, so that outside load hits both alike
                limits.append(_limit_rate(images, cfg))
                for workers in args.workers:
                    cfg.workers = workers
                    pipelines[workers].append(_pipeline_rate(cfg))
            limit = statistics.median(r for r, _ in limits)
            limit_cpu = statistics.median(c for _, c in limits)
            for workers, runs in pipelines.items():
                rate = statistics.median(r for r, _ in runs)
                cpu = statistics.median(c for _, c in runs)
                rows.append({"dataset": name, "image_size": size, "images": len(images), "workers": workers,
                             "limit_images_per_s": limit, "pipeline_images_per_s": rate,
                             "per_worker_ratio": rate / (workers * limit),
                             "limit_cpu_s_per_image": limit_cpu, "pipeline_cpu_s_per_image": cpu,
                             "cpu_efficiency": limit_cpu / cpu})

    table = Table(title="Training input pipeline vs per-core decode+augment limit (images/s)")
    columns = ("dataset", "px", "images", "workers", "limit (1 core)", "pipeline", "per worker", "cpu eff.")
    for column in columns:
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for r in rows:
        table.add_row(r["dataset"], str(r["image_size"]), str(r["images"]), str(r["workers"]),
                      f"{r['limit_images_per_s']:.0f}", f"{r['pipeline_images_per_s']:.0f}",
                      f"{r['per_worker_ratio']:.2f}x", f"{r['cpu_efficiency']:.2f}x")
    Console().print(table)
    load = dict(zip(("1min", "5min", "15min"), os.getloadavg()))
    payload = {"smoke": args.smoke, "batch_size": args.batch_size, "repeats": args.repeats,
               "load_average": load, "versions": _versions(), "rows": rows}
    path = write_result("bench_data", payload, args.out)
    print(f"wrote {path}")


def _versions() -> dict[str, str]:
    import PIL
    import timm

    return {"timm": timm.__version__, "webdataset": wds.__version__, "pillow": PIL.__version__}


if __name__ == "__main__":
    main()
