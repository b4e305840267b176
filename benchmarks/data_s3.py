"""Reading shards from an S3-compatible server vs local disk (``bench_data.py --s3``).

moto's standalone server runs on 127.0.0.1 (no network beyond loopback; it is in the test extra); the
same shards are read from a local folder and from the server through s3fs, side by side in one run:
- pipeline: one epoch of ``build_train_loader(...).raw_batches()`` in one process (``workers=0``: read,
  shuffle, decode, augment, batch), images/s and bytes read per sample (the tar reader's own count);
- slice: one rank of 8 reading its share (an eighth of the epoch, in slices of many shards), bytes read
  per sample delivered with the manifest's byte offsets (seek) and with a manifest without them (skip).
Loopback S3 has no network latency, so the ratio is the client stack's CPU cost, not a cloud figure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


def _start_moto() -> tuple[subprocess.Popen, dict[str, str]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    return server, env


def _epoch(source: str, image_size: int) -> dict[str, float]:
    from defocus_scale.data.config import DataConfig
    from defocus_scale.data.loader import build_train_loader
    from defocus_scale.data.tar_reader import READS

    cfg = DataConfig(source=source, num_classes=10, image_size=image_size, batch_size=32, workers=0,
                     drop_last=False, mixup=0.0, cutmix=0.0)  # fmt: skip
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=0)
    images = 0
    with READS.measure() as reads:
        start = time.perf_counter()
        for batch, _, _ in loader.raw_batches():
            images += len(batch)
        seconds = time.perf_counter() - start
    return {"images": images, "images_per_s": images / seconds, "bytes_per_sample": reads.bytes / images}


def _slice_bytes(source: str) -> float:
    from defocus_scale.data.stream import open_stream
    from defocus_scale.data.tar_reader import READS

    stream = open_stream(source, rank=3, world_size=8, seed=0, decode=False, num_substreams=1)
    with READS.measure() as reads:
        count = sum(1 for _ in stream)
    return reads.bytes / max(1, count)


def run(smoke: bool = False) -> list[dict[str, Any]]:
    import fsspec
    import s3fs

    from defocus_scale.data.make_shards import make_shards

    server, env = _start_moto()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    rows = []
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("bench")
        samples, size = (256, 64) if smoke else (2048, 128)
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / "shards"
            make_shards("synthetic", local, synthetic_samples=samples, synthetic_classes=10,
                        synthetic_image_size=size, samples_per_shard=64, progress=False)  # fmt: skip
            fs.put(str(local), "bench/shards", recursive=True)
            bare = Path(scratch) / "no_offsets"
            bare.mkdir()
            for path in local.iterdir():
                (bare / path.name).write_bytes(path.read_bytes())
            pq.write_table(pq.read_table(local / "manifest.parquet").drop_columns(["offsets"]),
                           bare / "manifest.parquet")  # fmt: skip
            fs.put(str(bare), "bench/no_offsets", recursive=True)
            shard_bytes = sum(p.stat().st_size for p in local.glob("*.tar")) / samples
            for where, source in (("local disk", str(local)), ("s3 (loopback)", "s3://bench/shards")):
                epoch = _epoch(source, size)
                seek = _slice_bytes(source)
                skip = _slice_bytes(str(bare) if where == "local disk" else "s3://bench/no_offsets")
                rows.append({"storage": where, "samples": samples, "image_size": size,
                             "shard_bytes_per_sample": shard_bytes, **epoch,
                             "slice_bytes_per_sample_seek": seek, "slice_bytes_per_sample_skip": skip})
        for row in rows:
            row["images_per_s_vs_local"] = row["images_per_s"] / rows[0]["images_per_s"]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()
        server.terminate()
        server.wait(30)
    return rows
