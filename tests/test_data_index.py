"""Shards without a manifest: indexed once by all ranks at the start, then split by sample."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from test_bad_data import _overrides, _torchrun

from defocus_scale.data.make_shards import make_shards
from defocus_scale.data.shard_list import resolve_shards
from defocus_scale.data.stream import ShardReadError
from defocus_scale.train import data_index
from defocus_scale.train.data_index import indexed_source


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("index") / "shards"
    make_shards("synthetic", root, synthetic_samples=120, synthetic_classes=5, synthetic_image_size=16,
                samples_per_shard=20, progress=False)  # fmt: skip
    return root


def _bare(shards: Path, target: Path) -> Path:
    shutil.copytree(shards, target)
    (target / "manifest.parquet").unlink()
    return target


def test_a_source_without_a_manifest_is_indexed_once_into_the_run(shards: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:  # fmt: skip
    assert indexed_source(str(shards), str(tmp_path / "run"), rank=0, world_size=1, max_bad_fraction=0) == \
        str(shards)  # a manifest already: nothing to do
    bare = _bare(shards, tmp_path / "bare")
    pattern = str(bare / "train-{000000..000005}.tar")
    manifest = indexed_source(pattern, str(tmp_path / "run"), rank=0, world_size=1, max_bad_fraction=0)
    assert manifest.startswith(str(tmp_path / "run" / "data_index")) and os.path.isfile(manifest)
    indexed, original = resolve_shards(manifest), resolve_shards(str(shards))
    assert [Path(s.url).name for s in indexed] == [Path(s.url).name for s in original]
    assert all(Path(s.url).parent == bare for s in indexed)  # absolute URLs of the shards read
    assert [s.samples for s in indexed] == [s.samples for s in original]
    assert all((a.offsets == b.offsets).all() for a, b in zip(indexed, original))

    def no_scan(url: str) -> None:
        raise AssertionError("scanned again")

    monkeypatch.setattr(data_index, "scan_or_explain", no_scan)  # a later start reads the run's manifest
    again = indexed_source(pattern, str(tmp_path / "run"), rank=0, world_size=1, max_bad_fraction=0)
    assert again == manifest


def test_unreadable_shards_are_left_out_or_stop_the_run(shards: Path, tmp_path: Path, caplog) -> None:
    bare = _bare(shards, tmp_path / "bare")
    tars = sorted(bare.glob("*.tar"))
    os.truncate(tars[2], tars[2].stat().st_size // 3)
    with caplog.at_level(logging.WARNING):
        manifest = indexed_source(str(bare), str(tmp_path / "a"), rank=0, world_size=1, max_bad_fraction=0.2)
    assert [Path(s.url).name for s in resolve_shards(manifest)] == [t.name for t in tars if t != tars[2]]
    assert tars[2].name in caplog.text
    with pytest.raises(ShardReadError, match=r"1 of 6 shards .* cannot be read.*train-000002\.tar"):
        indexed_source(str(bare), str(tmp_path / "b"), rank=0, world_size=1, max_bad_fraction=0.1)


@pytest.mark.distributed
def test_two_ranks_index_a_bare_directory_and_split_it_by_sample(shards: Path, tmp_path: Path) -> None:
    bare = _bare(shards, tmp_path / "bare")
    run_dir = tmp_path / "run"
    overrides = _overrides(bare, run_dir, **{"trainer.max_steps": 7, "trainer.audit_samples": True,
                                             "data.workers": 2, "trainer.checkpoint_every": 7})  # fmt: skip
    done = _torchrun(overrides)
    assert done.returncode == 0, done.stderr[-6000:]
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["planned_epochs"] >= 1  # sample counts known: the epoch's length agreed up front
    assert len(list((run_dir / "data_index").glob("*/manifest.parquet"))) == 1
    from defocus_scale.train.checkpoint import TRAINER_STATE, CheckpointStore

    consumed = CheckpointStore(str(run_dir)).read_json(7, TRAINER_STATE)["consumed_keys"]
    assert len(consumed) == 7 * 16 and len(set(consumed)) == len(consumed)
