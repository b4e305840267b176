"""The S3 server goes away in the middle of an epoch and comes back: the stream's reads fail, are retried
with backoff from the sample they stopped at, and every sample is still delivered exactly once.

moto's standalone server keeps its objects in memory, so the "restart" brings a new server up on the same
port and puts the same objects back, as a store with durable storage would come back with them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from test_object_store import _free_port  # noqa: E402


class _Server:
    def __init__(self, port: int) -> None:
        self.port, self.process = port, None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import socket

        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(30)


def _fresh_s3():
    import fsspec
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances keep the endpoint they were made with
    return fsspec.filesystem("s3", skip_instance_cache=True)


@pytest.fixture
def server() -> Iterator[_Server]:
    server = _Server(_free_port())
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.port}",
           # botocore gives up at once, so that an outage of seconds reaches the stream's own retries
           "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}  # fmt: skip
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _fresh_s3()


def _upload(local: Path) -> None:
    fs = _fresh_s3()
    fs.mkdir("bucket")
    for path in sorted(local.iterdir()):
        fs.put_file(str(path), f"bucket/shards/{path.name}")


def test_reads_survive_a_server_restart_mid_epoch(server: _Server, tmp_path: Path, caplog) -> None:
    from defocus_scale.data.make_shards import make_shards
    from defocus_scale.data.stream import open_stream

    local = tmp_path / "shards"
    make_shards("synthetic", local, synthetic_samples=96, synthetic_classes=4, synthetic_image_size=16,
                samples_per_shard=16, progress=False)  # fmt: skip
    _upload(local)
    stream = open_stream("s3://bucket/shards", rank=0, world_size=1, seed=0, decode=False, shuffle_buffer=4,
                         open_shards=3, read_retries=8, retry_backoff_s=0.25)  # fmt: skip
    assert stream.shards[0].offsets is not None  # make_shards' manifest has them: readers seek

    def restart() -> None:
        server.stop()
        time.sleep(4.0)  # longer than s3fs's own retries (~2 s): the stream's retries carry the read over
        server.start()
        _upload(local)

    keys, restarter = [], threading.Thread(target=restart)
    with caplog.at_level(logging.WARNING, logger="defocus_scale.data.stream"):
        for sample in stream:
            keys.append(sample["__key__"])
            if len(keys) == 30:
                restarter.start()
                time.sleep(0.5)  # the server is down now: the next reads fail
    restarter.join()
    assert len(keys) == 96 and len(set(keys)) == 96  # nothing lost, nothing twice
    assert "retry 1 of 8" in caplog.text, caplog.text[-3000:]
    assert not stream.bad_shards()
