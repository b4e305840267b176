"""open_stream: rank splits, shuffling, exactly-once elastic resume, bad shards and samples."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from defocus_scale.data.stream import ShardReadError, WorkUnit, open_stream, split_work
from defocus_scale.data.tar_reader import iter_members

SHARD_SIZES = (7, 12, 5, 9, 11, 4, 8)  # uneven on purpose: 56 samples


def _png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(directory: Path, sizes=SHARD_SIZES, *, manifest: bool = True, num_classes: int = 3,
                 image_size: int = 8) -> list[str]:
    """Tiny WebDataset shards ``shard-{i:06d}.tar`` of PNGs (keys ``s{shard}-{index}``), and a manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for shard, size in enumerate(sizes):
        path = directory / f"shard-{shard:06d}.tar"
        counts = [0] * num_classes
        with wds.TarWriter(str(path)) as writer:
            for index in range(size):
                label = (shard + index) % num_classes
                counts[label] += 1
                image = _png(100 * shard + index, image_size)
                writer.write({"__key__": f"s{shard}-{index:03d}", "png": image, "cls": label})
        paths.append(str(path))
        rows.append((path.name, size, path.stat().st_size, counts))
    if manifest:
        table = pa.table({"shard": [r[0] for r in rows], "samples": [r[1] for r in rows],
                          "bytes": [r[2] for r in rows], "class_counts": [r[3] for r in rows]})
        pq.write_table(table, directory / "manifest.parquet")
    return paths


def all_keys(sizes=SHARD_SIZES) -> list[str]:
    return [f"s{shard}-{index:03d}" for shard, size in enumerate(sizes) for index in range(size)]


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    write_shards(tmp_path / "shards")
    return tmp_path / "shards"


def _options(shuffle: bool) -> dict:
    return dict(shuffle=shuffle, decode=False, shuffle_buffer=6, open_shards=3)


def _run(stream, limit: int | None = None) -> list[str]:
    keys = []
    for sample in stream:
        keys.append(sample["__key__"])
        if limit is not None and len(keys) == limit:
            break
    return keys


def _resume_chain(source, worlds: list[int], shuffle: bool, rng: np.random.Generator) -> list[str]:
    """Run world sizes in turn, each rank stopping at a random point; the last run goes to the end."""
    delivered: list[str] = []
    states = None
    for step, world in enumerate(worlds):
        last = step == len(worlds) - 1
        new_states = []
        for rank in range(world):
            stream = open_stream(source, rank=rank, world_size=world, seed=7, **_options(shuffle))
            if states is not None:
                stream.load_state_dict(json.loads(json.dumps(states)))  # states must survive JSON
            remaining = stream.samples_remaining()
            limit = None if last else int(rng.integers(0, (remaining or 20) + 1))
            delivered += _run(stream, limit)
            new_states.append(stream.state_dict())
        states = new_states
    return delivered


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("worlds", [[2, 3], [3, 2], [2, 3, 1]])
def test_exactly_once_across_elastic_resumes(shard_dir: Path, shuffle: bool, worlds: list[int]) -> None:
    for trial in range(4):
        delivered = _resume_chain(shard_dir, worlds, shuffle, np.random.default_rng(trial))
        assert Counter(delivered) == Counter(all_keys()), f"trial {trial}"


def test_exactly_once_without_manifest_from_brace_pattern(tmp_path: Path) -> None:
    write_shards(tmp_path, manifest=False)
    pattern = str(tmp_path / "shard-{000000..000006}.tar")
    stream = open_stream(pattern, rank=0, world_size=1, seed=0)
    assert stream.samples_remaining() is None  # sizes unknown without a manifest
    for trial in range(3):
        delivered = _resume_chain(pattern, [2, 3], True, np.random.default_rng(trial))
        assert Counter(delivered) == Counter(all_keys())


def test_brace_pattern_uses_the_manifest_beside_the_shards(shard_dir: Path) -> None:
    pattern = str(shard_dir / "shard-{000000..000006}.tar")
    streams = [open_stream(pattern, rank=r, world_size=3, seed=0, **_options(True)) for r in range(3)]
    assert sorted(s.samples_remaining() for s in streams) == [18, 19, 19]  # split by sample, not by shard
    assert Counter(k for s in streams for k in _run(s)) == Counter(all_keys())
    subset = open_stream(str(shard_dir / "shard-{000001..000002}.tar"), rank=0, world_size=1, seed=0)
    assert subset.samples_remaining() == SHARD_SIZES[1] + SHARD_SIZES[2]


@pytest.mark.parametrize("worlds", [[2, 3], [3, 1]])
def test_repeated_views_exactly_once_across_elastic_resumes(shard_dir: Path, worlds: list[int]) -> None:
    """repeats=3: an epoch is a third of the data, each of its samples 3 times, in any world sequence."""
    by_epoch = []
    for epoch in range(3):
        delivered, states = [], None
        rng = np.random.default_rng(epoch)
        for step, world in enumerate(worlds):
            new_states = []
            for rank in range(world):
                stream = open_stream(shard_dir, rank=rank, world_size=world, seed=7, epoch=epoch, repeats=3,
                                     batch_size=4, **_options(True))  # fmt: skip
                if states is not None:
                    stream.load_state_dict(json.loads(json.dumps(states)))
                last = step == len(worlds) - 1
                limit = None if last else int(rng.integers(0, stream.samples_remaining() + 1))
                delivered += [(s["__key__"], s["__view__"]) for s in _take(stream, limit)]
                new_states.append(stream.state_dict())
            states = new_states
        assert len(delivered) == len(set(delivered))  # no (sample, view) twice
        keys = Counter(k for k, _ in delivered)
        assert set(keys.values()) == {3} and abs(len(keys) - len(all_keys()) / 3) <= 1
        by_epoch.append(set(keys))
    assert set.union(*by_epoch) == set(all_keys()) and sum(map(len, by_epoch)) == len(all_keys())


def _take(stream, limit: int | None) -> list[dict]:
    out = []
    for sample in stream:
        out.append(sample)
        if limit is not None and len(out) == limit:
            break
    return out


def test_views_of_a_sample_wait_a_batch(shard_dir: Path) -> None:
    stream = open_stream(shard_dir, rank=0, world_size=1, seed=0, repeats=3, batch_size=4, shuffle_buffer=40)
    keys = [s["__key__"] for s in stream]
    batches = [keys[i: i + 4] for i in range(0, len(keys) - 8, 4)]  # all but the epoch's last 2 batches
    assert all(len(set(b)) == len(b) for b in batches)


def test_a_failed_read_is_retried_from_the_sample_it_stopped_at(shard_dir: Path, monkeypatch, caplog) -> None:
    from defocus_scale.data import stream as stream_module

    real, calls, failed = stream_module.iter_shard, [], set()

    def flaky(url: str, start: int = 0, stop=None, picks=None, **kwargs):
        calls.append((Path(url).name, start))
        for n, item in enumerate(real(url, start, stop, picks, **kwargs)):
            if n == 2 and url not in failed:  # the connection drops after 2 samples, once per shard
                failed.add(url)
                raise ConnectionResetError("connection reset by peer")
            yield item

    monkeypatch.setattr(stream_module, "iter_shard", flaky)
    stream = open_stream(shard_dir, rank=0, world_size=1, seed=0, retry_backoff_s=0.01, **_options(True))
    with caplog.at_level(logging.WARNING, logger="defocus_scale.data.stream"):
        assert Counter(_run(stream)) == Counter(all_keys())  # nothing lost, nothing twice
    assert not stream.bad_shards() and "retry 1 of 3" in caplog.text
    reopened = [(name, start) for name, start in calls if calls.count((name, start)) == 1]
    for name in {Path(u).name for u in failed}:
        starts = [start for n, start in calls if n == name]
        assert starts[1] == starts[0] + 2  # reopened at the sample after the last one read
    assert reopened


def test_a_read_that_keeps_failing_makes_the_shard_bad(shard_dir: Path, monkeypatch) -> None:
    from defocus_scale.data import stream as stream_module

    def broken(url: str, *args, **kwargs):
        if url.endswith("shard-000003.tar"):
            raise TimeoutError("read timed out")
        return real(url, *args, **kwargs)

    real = stream_module.iter_shard
    monkeypatch.setattr(stream_module, "iter_shard", broken)
    stream = open_stream(shard_dir, rank=0, world_size=1, seed=0, retry_backoff_s=0.001, read_retries=2,
                         max_bad_fraction=0.2, **_options(True))  # fmt: skip
    keys = _run(stream)
    assert {Path(u).name for u in stream.bad_shards()} == {"shard-000003.tar"}
    assert Counter(keys) == Counter(k for k in all_keys() if not k.startswith("s3-"))


def test_pipe_urls_are_read(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, sizes=(3, 4), manifest=False)
    stream = open_stream([f"pipe:cat {p}" for p in paths], rank=0, world_size=1, seed=0, decode=False)
    assert sorted(_run(stream)) == all_keys((3, 4))


def test_fsspec_urls_are_read(tmp_path: Path) -> None:
    """URLs of schemes webdataset does not know (object stores) go through fsspec: here its memory store."""
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    paths = write_shards(tmp_path, sizes=(3, 4))
    urls = [f"memory://defocus-test/{Path(p).name}" for p in paths]
    try:
        for path in [*paths, tmp_path / "manifest.parquet"]:
            memory.pipe(f"memory://defocus-test/{Path(path).name}", Path(path).read_bytes())
        stream = open_stream(urls, rank=0, world_size=1, seed=0, decode=False)
        assert sorted(_run(stream)) == all_keys((3, 4))
        ranks = [open_stream("memory://defocus-test/manifest.parquet", rank=r, world_size=2, seed=0)
                 for r in range(2)]
        assert sorted(s.samples_remaining() for s in ranks) == [3, 4]  # sizes from the remote manifest
        assert sorted(k for s in ranks for k in _run(s)) == all_keys((3, 4))
    finally:
        memory.rm("memory://defocus-test", recursive=True)


def test_ranks_split_evenly_and_cover_everything(shard_dir: Path) -> None:
    per_rank = [_run(open_stream(shard_dir, rank=r, world_size=3, seed=1, **_options(True)))
                for r in range(3)]
    assert Counter(k for keys in per_rank for k in keys) == Counter(all_keys())
    assert sorted(len(keys) for keys in per_rank) == [18, 19, 19]  # 56 samples: equal to within one


def test_same_world_resume_continues_bit_for_bit(shard_dir: Path) -> None:
    uninterrupted = _run(open_stream(shard_dir, rank=1, world_size=2, seed=3, **_options(True)))
    first = open_stream(shard_dir, rank=1, world_size=2, seed=3, **_options(True))
    head = _run(first, 11)
    states = [open_stream(shard_dir, rank=0, world_size=2, seed=3).state_dict(), first.state_dict()]
    second = open_stream(shard_dir, rank=1, world_size=2, seed=3, **_options(True))
    second.load_state_dict(states)
    assert head + _run(second) == uninterrupted


def test_order_is_deterministic_and_depends_on_seed_and_epoch(shard_dir: Path) -> None:
    def order(seed: int, epoch: int) -> list[str]:
        return _run(open_stream(shard_dir, rank=0, world_size=1, seed=seed, epoch=epoch, **_options(True)))

    reference = order(5, 0)
    assert order(5, 0) == reference
    assert sorted(reference) == sorted(all_keys())
    assert order(5, 1) != reference
    assert order(6, 0) != reference
    unshuffled = _run(open_stream(shard_dir, rank=0, world_size=1, seed=5, **_options(False)))
    assert unshuffled == all_keys()


def test_set_epoch_starts_a_fresh_epoch_and_load_adopts_the_saved_one(shard_dir: Path) -> None:
    stream = open_stream(shard_dir, rank=0, world_size=1, seed=0, epoch=2, **_options(True))
    _run(stream, 5)
    restored = open_stream(shard_dir, rank=0, world_size=1, seed=0, **_options(True))
    restored.load_state_dict([stream.state_dict()])
    assert restored.epoch == 2 and restored.samples_remaining() == len(all_keys()) - 5
    restored.set_epoch(2)  # same epoch: progress kept
    assert restored.samples_remaining() == len(all_keys()) - 5
    restored.set_epoch(3)
    assert restored.samples_remaining() == len(all_keys())


def test_decoded_samples(shard_dir: Path) -> None:
    sample = next(iter(open_stream(shard_dir, rank=0, world_size=1, seed=0, shuffle=False)))
    assert sample["__key__"] == "s0-000" and sample["label"] == 0
    assert sample["image"].mode == "RGB" and sample["image"].size == (8, 8)
    raw = next(iter(open_stream(shard_dir, rank=0, world_size=1, seed=0, shuffle=False, decode=False)))
    assert raw["png"] == _png(0) and raw["label"] == 0


def test_state_is_small_and_rejects_foreign_states(shard_dir: Path, tmp_path: Path) -> None:
    stream = open_stream(shard_dir, rank=0, world_size=2, seed=0, **_options(True))
    _run(stream, 9)
    state = stream.state_dict()
    assert len(json.dumps(state)) < 4000
    other = open_stream(write_shards(tmp_path / "other", sizes=(3, 3)), rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="another shard list"):
        other.load_state_dict([state, {**state, "rank": 1}])
    with pytest.raises(ValueError, match="all ranks"):  # another rank's state alone is not enough
        stream.load_state_dict([{**state, "rank": 1}])
    again = open_stream(shard_dir, rank=0, world_size=2, seed=0, **_options(True))
    again.load_state_dict([state])  # this rank's own, at an unchanged world size: what a checkpoint gives it
    assert again.state_dict() == state


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) * 2 // 3 + 100])  # cuts inside a member


def _corrupt(path: str) -> None:
    data = bytearray(Path(path).read_bytes())
    data[1500:2500] = os.urandom(1000)  # overwrites the second member's header
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("manifest", [True, False])
def test_bad_shards_are_warned_counted_and_skipped(tmp_path: Path, manifest: bool, caplog) -> None:
    sizes = (6,) * 10
    paths = write_shards(tmp_path, sizes=sizes, manifest=manifest)
    source = tmp_path if manifest else paths
    streams = [open_stream(source, rank=r, world_size=2, seed=0, max_bad_fraction=0.3, **_options(True))
               for r in range(2)]
    _truncate(paths[1])
    _corrupt(paths[4])
    os.remove(paths[7])  # disappears after the epoch was planned
    with caplog.at_level(logging.WARNING, logger="defocus_scale.data.stream"):
        delivered = [k for stream in streams for k in _run(stream)]
    bad = {Path(p).name for stream in streams for p in stream.bad_shards()}
    assert bad == {"shard-000001.tar", "shard-000004.tar", "shard-000007.tar"}
    for name in bad:
        assert name in caplog.text
    good = [k for k in all_keys(sizes) if k.split("-")[0] not in ("s1", "s4", "s7")]
    assert Counter(k for k in delivered if k.split("-")[0] not in ("s1", "s4", "s7")) == Counter(good)
    assert len(delivered) == len(set(delivered))  # samples read before a shard broke are kept, once


def test_too_many_bad_shards_is_fatal_and_names_them(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, sizes=(4,) * 10)
    _truncate(paths[2])
    os.remove(paths[5])
    stream = open_stream(tmp_path, rank=0, world_size=1, seed=0, max_bad_fraction=0.1, **_options(False))
    with pytest.raises(ShardReadError, match=r"2 of 10 shards.*shard-000002\.tar.*shard-000005\.tar"):
        _run(stream)


def test_a_shard_shorter_than_its_manifest_is_bad(tmp_path: Path, caplog) -> None:
    write_shards(tmp_path, sizes=(4, 4))
    table = pq.read_table(tmp_path / "manifest.parquet").to_pydict()
    table["samples"][0] = 6
    pq.write_table(pa.table(table), tmp_path / "manifest.parquet")
    stream = open_stream(tmp_path, rank=0, world_size=1, seed=0, max_bad_fraction=0.5, **_options(False))
    with caplog.at_level(logging.WARNING):
        assert _run(stream) == all_keys((4, 4))
    assert "ended before sample 4 (expected 6)" in caplog.text


def test_undecodable_samples_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    path = tmp_path / "mixed.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "good", "png": _png(0), "cls": 1})
        writer.write({"__key__": "broken", "jpg": b"not a jpeg at all", "cls": 1})
        writer.write({"__key__": "nolabel", "png": _png(1)})
        writer.write({"__key__": "good2", "png": _png(2), "cls": 0})
    stream = open_stream([str(path)], rank=0, world_size=1, seed=0, shuffle=False)
    with caplog.at_level(logging.WARNING):
        assert [s["__key__"] for s in stream] == ["good", "good2"]
    assert stream.state_dict()["substreams"][0]["bad_samples"] == 2
    assert "'broken'" in caplog.text and "'nolabel'" in caplog.text


def test_split_work_cuts_ranges_and_picks_evenly() -> None:
    units = [WorkUnit(0, 0, 5), WorkUnit(1, 2, 9, (2, 4, 8)), WorkUnit(2, 3, 7)]
    parts = split_work(units, 3)
    assert [sum(u.size for u in part) for part in parts] == [4, 4, 4]
    assert parts[1] == [WorkUnit(0, 4, 5), WorkUnit(1, 2, 9, (2, 4, 8))]
    assert split_work([WorkUnit(0, 0, None), WorkUnit(1, 0, 4)], 2) == [[WorkUnit(0, 0, None)],
                                                                      [WorkUnit(1, 0, 4)]]


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no manifest.parquet and no .tar"):
        open_stream(tmp_path, rank=0, world_size=1, seed=0)
    with pytest.raises(FileNotFoundError, match="none of the 3 shard"):
        open_stream(str(tmp_path / "x-{0..2}.tar"), rank=0, world_size=1, seed=0)


def _tarfile_listing(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_match_tarfile_also_beyond_plain_ustar(tmp_path: Path, tar_format: int) -> None:
    """Plain members take the fast path; long and non-ASCII names (GNU/PAX headers), directories and
    compressed archives hand over to tarfile midway or from the start, with the same result."""
    members = [("a/x.cls", b"1"), ("a/x.png", _png(1)), ("d/" + "n" * 60 + "/" + "m" * 60 + ".png", _png(2)),
               ("a/y.cls", b"2"), ("é/ü.cls", b"3"), ("z" * 120 + ".jpg", b"\xff" * 700), ("a/z.cls", b"")]
    if tar_format == tarfile.USTAR_FORMAT:  # ustar has neither long final components nor UTF-8 headers
        members = members[:4]
    for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz")):
        path = tmp_path / f"mixed{suffix}"
        with tarfile.open(path, mode, format=tar_format) as tar:
            directory = tarfile.TarInfo("a")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with open(path, "rb") as stream:
            assert list(iter_members(stream, str(path))) == _tarfile_listing(path) == members


def test_tar_members_reject_cuts_and_bad_headers(tmp_path: Path) -> None:
    path = write_shards(tmp_path, sizes=(3,), manifest=False)[0]
    data = Path(path).read_bytes()
    expected = _tarfile_listing(Path(path))
    assert list(iter_members(io.BytesIO(data), path)) == expected
    ends = [i for i in range(512, len(data), 512) if data[i : i + 512] == bytes(512)]
    for cut in (ends[0], ends[0] + 512, len(data) // 2, 700):  # at the end marker, in it, in a member
        with pytest.raises(tarfile.ReadError):
            list(iter_members(io.BytesIO(data[:cut]), path))
    flipped = bytearray(data)
    flipped[1024 + 10] ^= 0xFF  # the second member's name: its checksum no longer matches
    with pytest.raises(tarfile.ReadError):
        list(iter_members(io.BytesIO(bytes(flipped)), path))


def test_shards_written_in_class_order_are_warned_about(tmp_path: Path, caplog) -> None:
    mixed = tmp_path / "mixed"
    write_shards(mixed, (9, 9, 9))  # labels cycle within every shard
    with caplog.at_level(logging.WARNING, logger="defocus_scale.data.stream"):
        open_stream(mixed, rank=0, world_size=1, seed=0)
    assert "few classes" not in caplog.text
    sorted_dir = tmp_path / "sorted"
    write_shards(sorted_dir, (9, 9, 9))
    table = pq.read_table(sorted_dir / "manifest.parquet")  # a manifest saying: one class per shard
    counts = pa.array([[9, 0, 0], [0, 9, 0], [0, 0, 9]], type=pa.list_(pa.int64()))
    pq.write_table(table.set_column(3, "class_counts", counts), sorted_dir / "manifest.parquet")
    with caplog.at_level(logging.WARNING, logger="defocus_scale.data.stream"):
        stream = open_stream(sorted_dir, rank=0, world_size=1, seed=0)
    assert "3 of 3 shards checked" in caplog.text and "few classes" in caplog.text
    assert all(f"shard-{i:06d}.tar: 1 of ~3" in caplog.text for i in range(3))
    assert sorted(_run(stream)) == sorted(all_keys((9, 9, 9)))  # only a warning: reading goes on
