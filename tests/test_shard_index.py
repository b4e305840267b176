"""Per-sample byte offsets of shards: recorded by make_shards, found again by the header-only scan, used by
iter_shard to seek instead of reading through; and `defocus-scale index-shards`."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from defocus_scale.data.make_shards import make_shards
from defocus_scale.data.manifest import MANIFEST_NAME, ShardIndexError, index_shards, read_manifest
from defocus_scale.data.tar_reader import READS, iter_shard, scan_shard

SAMPLES_PER_SHARD = 100


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards of 100 synthetic samples (32 px PNGs of ~2.5 KB), written by make_shards."""
    out = tmp_path_factory.mktemp("shards")
    make_shards("synthetic", out, synthetic_samples=3 * SAMPLES_PER_SHARD, synthetic_classes=10,
                samples_per_shard=SAMPLES_PER_SHARD, progress=False)  # fmt: skip
    return out


def _rows(directory: Path) -> list[dict]:
    return read_manifest(directory).to_pylist()


def _first_headers(path: Path) -> list[int]:
    """tarfile's offset of each sample's first member (what the manifest should record)."""
    offsets, key = [], None
    with tarfile.open(path) as tar:
        for member in tar:
            member_key = member.name.split(".", 1)[0]
            if member.isreg() and not member_key.rsplit("/", 1)[-1].startswith("__") and member_key != key:
                offsets.append(member.offset)
                key = member_key
    return offsets


def test_make_shards_records_the_offsets_the_scan_finds(shards: Path) -> None:
    for row in _rows(shards):
        path = shards / row["shard"]
        assert row["offsets"] == _first_headers(path) and len(row["offsets"]) == row["samples"]
        scanned = scan_shard(str(path))
        assert scanned.shard == str(path)
        assert (scanned.samples, scanned.bytes, list(scanned.offsets)) == (row["samples"], row["bytes"],
                                                                           row["offsets"])  # fmt: skip
        assert list(scanned.class_counts) + [0] * (10 - len(scanned.class_counts)) == row["class_counts"]


CASES = [
    {}, {"start": 10, "stop": 20}, {"start": 99}, {"start": 99, "stop": 100}, {"start": 50, "stop": 50},
    {"start": 150}, {"start": 0, "stop": 1000}, {"picks": [99, 3, 4, 5, 50, 7, 3]}, {"picks": []},
    {"picks": [0]}, {"picks": [98, 99, 250, -1]}, {"start": 10, "picks": [5, 10, 11, 40]},
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_iter_shard_with_offsets_yields_what_it_yields_without(shards: Path, case: dict) -> None:
    row = _rows(shards)[1]
    url = str(shards / row["shard"])
    expected = list(iter_shard(url, **case))
    assert list(iter_shard(url, **case, offsets=row["offsets"])) == expected
    assert list(iter_shard(url, **case, offsets=np.asarray(row["offsets"], dtype=np.int64))) == expected
    if case.get("start") == 99 and "picks" not in case:
        assert [index for index, _ in expected] == [99]  # the last sample


def test_reads_with_offsets_cost_the_samples_read(shards: Path) -> None:
    row = _rows(shards)[0]
    url, offsets, size = str(shards / row["shard"]), row["offsets"], row["bytes"]
    with READS.measure() as whole:
        list(iter_shard(url))
    with READS.measure() as second_half:
        list(iter_shard(url, 50, offsets=offsets))
    with READS.measure() as middle:
        list(iter_shard(url, 40, 60, offsets=offsets))
    with READS.measure() as two_picks:
        list(iter_shard(url, picks=[10, 70], offsets=offsets))
    assert whole.bytes == size
    assert 0.4 * size < second_half.bytes < 0.6 * size, (second_half.bytes, size)
    assert middle.bytes == offsets[60] - offsets[40]  # exactly the range: nothing past its end
    assert two_picks.bytes == offsets[11] - offsets[10] + offsets[71] - offsets[70]


def test_scan_reads_only_headers(shards: Path) -> None:
    for row in _rows(shards):
        with READS.measure() as reads:
            scan_shard(str(shards / row["shard"]))
        assert reads.bytes < 0.27 * row["bytes"], (reads.bytes, row["bytes"])


def _foreign_shard(path: Path) -> list[tuple[str, bytes]]:
    """A tar as other writers make them: PAX headers (long and non-ASCII names), a directory, metadata."""
    members = [("__meta__.json", b"{}")]
    for i in range(12):
        key = f"d{i % 3}/" + ("k" * 120 if i % 4 == 0 else "é" if i % 4 == 1 else "s") + f"{i:03d}"
        members += [(f"{key}.cls", str(i % 5).encode()), (f"{key}.jpg", bytes([i]) * (700 + 300 * i))]
        if i == 6:
            members.append(("__index__.txt", b"x"))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("d0")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return members


def test_foreign_tars_scan_and_seek_through_tarfile(tmp_path: Path) -> None:
    path = tmp_path / "foreign.tar"
    _foreign_shard(path)
    record = scan_shard(str(path))
    assert record.samples == 12 and list(record.offsets) == _first_headers(path)
    assert record.class_counts == (3, 3, 2, 2, 2)
    url = str(path)
    for case in ({}, {"start": 5, "stop": 9}, {"start": 11}, {"picks": [0, 1, 6, 7, 11]}):
        assert list(iter_shard(url, **case, offsets=record.offsets)) == list(iter_shard(url, **case))


def test_offsets_that_do_not_fit_the_shard_are_an_error(shards: Path) -> None:
    row = _rows(shards)[0]
    url = str(shards / row["shard"])
    for stale in ([offset + 100 for offset in row["offsets"]], [row["bytes"] + 512 * i for i in range(100)]):
        with pytest.raises(tarfile.ReadError, match="offsets do not fit"):
            list(iter_shard(url, 5, 8, offsets=stale))


def test_scan_rejects_truncated_and_corrupt_shards(shards: Path, tmp_path: Path) -> None:
    data = (shards / "train-000000.tar").read_bytes()
    cuts = {"half": data[: len(data) // 2], "marker": data[: _rows(shards)[0]["offsets"][-1] + 4096]}
    flipped = bytearray(data)
    flipped[_rows(shards)[0]["offsets"][3] + 10] ^= 0xFF  # a header's name: its checksum fails
    for name, payload in [*cuts.items(), ("flipped", bytes(flipped)), ("empty", b"")]:
        path = tmp_path / f"{name}.tar"
        path.write_bytes(payload)
        with pytest.raises(tarfile.ReadError, match=name):
            scan_shard(str(path))


def test_old_manifests_without_offsets_are_read(tmp_path: Path) -> None:
    table = pa.table({"shard": ["a.tar"], "samples": [1], "bytes": [10240], "class_counts": [[1]]})
    pq.write_table(table, tmp_path / MANIFEST_NAME)
    assert read_manifest(tmp_path).column_names == ["shard", "samples", "bytes", "class_counts"]
    pq.write_table(table.drop_columns(["class_counts"]), tmp_path / MANIFEST_NAME)
    with pytest.raises(ValueError, match="class_counts"):
        read_manifest(tmp_path)


def test_index_shards_rebuilds_the_manifest(shards: Path, tmp_path: Path, capsys) -> None:
    from defocus_scale.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / MANIFEST_NAME).unlink()
    assert main(["index-shards", str(copy), "--workers", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("indexed 3 shards (300 samples, 10 classes") and str(copy / MANIFEST_NAME) in line
    assert _rows(copy) == _rows(shards)

    (copy / MANIFEST_NAME).unlink()
    summary = index_shards(str(copy / "train-{000000..000002}.tar"), workers=1)
    assert summary.manifest == str(copy / MANIFEST_NAME) and summary.samples == 300
    assert summary.bytes_read < 0.27 * summary.bytes
    assert _rows(copy) == _rows(shards)

    elsewhere = index_shards(copy, tmp_path / "index" / "all.parquet")
    rows = read_manifest(elsewhere.manifest).to_pylist()
    assert [row["shard"] for row in rows] == [f"../copy/train-{i:06d}.tar" for i in range(3)]
    assert [row["offsets"] for row in rows] == [row["offsets"] for row in _rows(shards)]


def test_index_shards_errors_name_the_problem(shards: Path, tmp_path: Path, capsys) -> None:
    from defocus_scale.data.manifest import _index_main

    def run(source: str) -> str:
        import argparse

        assert _index_main(argparse.Namespace(source=source, out=None, workers=2)) == 2
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and captured.out == ""
        return captured.err.strip()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(str(empty)) == f"defocus-scale index-shards: error: no .tar shards in {empty}"
    assert "no shard directory" in run(str(tmp_path / "nowhere"))
    assert "train-000003.tar does not exist" in run(str(shards / "train-{000000..000009}.tar"))
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    data = (bad / "train-000001.tar").read_bytes()
    (bad / "train-000001.tar").write_bytes(data[: len(data) // 3])
    message = run(str(bad))
    assert "train-000001.tar is cut inside member" in message and message.count("\n") == 0
    with pytest.raises(ShardIndexError, match="train-000001.tar"):
        index_shards(bad)
    assert (bad / MANIFEST_NAME).exists()  # the old manifest stays: nothing is written on an error
