"""Bad data counted over all ranks and held to ``data.max_bad_fraction``: the combine and check on a fake
world, then 2-rank gloo trainings over shards some of which are truncated (and samples garbled)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_runs import REPO, TINY_MODEL

from defocus_scale.data.stream import ShardReadError
from defocus_scale.train.bad_data import (
    URLS_SHOWN,
    BadData,
    check_bad_data,
    combine_bad_data,
    gather_bad_data,
)
from defocus_scale.train.checkpoint import COMMIT_MARKER
from defocus_scale.train.cli import caused_by_the_user, worth_a_restart

CPU = torch.device("cpu")


def _rank(bad: tuple[str, ...] | list[str] = (), bad_samples: int = 0, delivered: int = 0,
          num_shards: int = 10) -> dict:  # fmt: skip
    return {"bad_shards": list(bad), "bad_samples": bad_samples, "delivered": delivered,
            "num_shards": num_shards}  # fmt: skip


def _check(total: BadData, fraction: float) -> None:
    check_bad_data(total, fraction, step=7, epoch=1, world_size=3)


def test_the_union_over_the_limit_stops_though_every_rank_is_under_it() -> None:
    world = [_rank(["s/0.tar", "s/1.tar"]), _rank(["s/5.tar", "s/6.tar"]), _rank(["s/8.tar"])]
    for figures in world:  # 2 of 10 each: under 0.3 x 10 on its own
        _check(combine_bad_data([figures]), 0.3)
    total = combine_bad_data(world)
    assert total.metrics() == {"data/bad_shards": 5.0, "data/bad_samples": 0.0}
    with pytest.raises(ShardReadError) as caught:
        _check(total, 0.3)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("step 7, epoch 1, over all 3 ranks: 5 of 10 shards (50.0%) are missing")
    assert "data.max_bad_fraction=0.3" in message and "s/0.tar, s/1.tar, s/5.tar, s/6.tar, s/8.tar" in message
    # The CLI reports it as the user's (one line, no traceback) and a launcher retries it (outages pass).
    assert caused_by_the_user(caught.value) and worth_a_restart(caught.value)


def test_a_shard_two_ranks_report_counts_once() -> None:
    world = [_rank(["a", "b"]), _rank(["b", "c"]), None]  # the third rank's loader reports nothing
    total = combine_bad_data(world)
    assert total.bad_shards == ("a", "b", "c") and total.reporting == 2
    _check(total, 0.3)  # 3 of 10: not more than 0.3 x 10
    assert total.summary()["data/bad_shard_urls"] == ["a", "b", "c"]


def test_the_message_names_the_first_few_urls() -> None:
    total = combine_bad_data([_rank([f"shard-{i:03d}.tar" for i in range(40)], num_shards=50)])
    with pytest.raises(ShardReadError, match=r"40 of 50 shards") as caught:
        _check(total, 0.05)
    assert f"shard-{URLS_SHOWN - 1:03d}.tar and {40 - URLS_SHOWN} more" in str(caught.value)
    assert f"shard-{URLS_SHOWN:03d}.tar" not in str(caught.value)


def test_undecodable_samples_are_held_to_the_fraction_over_all_ranks() -> None:
    world = [_rank(bad_samples=10, delivered=60), _rank(bad_samples=10, delivered=60)]
    for figures in world:  # 1 in 6 bad, but each rank alone has read too few samples to judge
        _check(combine_bad_data([figures]), 0.1)
    with pytest.raises(ShardReadError, match=r"20 of 120 samples read \(16.7%\) did not decode") as caught:
        _check(combine_bad_data(world), 0.1)
    assert "\n" not in str(caught.value)
    _check(combine_bad_data(world), 0.2)


class _Loader:
    def __init__(self, **figures: Any) -> None:
        self.figures = figures

    def stats(self) -> dict:
        return {"samples_remaining": 3, **self.figures}


def test_gather_without_a_process_group_and_in_a_world_of_one(world_of_one: None) -> None:
    loader = _Loader(bad_shards=["x.tar"], bad_samples=2, delivered=50, num_shards=4)
    expected = BadData(("x.tar",), 2, 50, 4, 1)
    assert gather_bad_data(loader, 1, CPU) == expected
    assert gather_bad_data(object(), 1, CPU) == BadData()  # a loader without stats(): nothing to report
    assert BadData().metrics() == {} and BadData().summary() == {}


def test_gather_without_torch_distributed() -> None:
    loader = _Loader(bad_shards=["y.tar", "x.tar"], bad_samples=0, delivered=10, num_shards=4)
    assert gather_bad_data(loader, 1, CPU).bad_shards == ("x.tar", "y.tar")


# ----------------------------------------------------------------------------- 2-rank trainings

SHARDS, PER_SHARD, FRACTION = 10, 16, 0.25  # at most 2 bad shards of 10


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from defocus_scale.data.make_shards import make_shards

    root = tmp_path_factory.mktemp("bad-data") / "clean"
    make_shards("synthetic", root, synthetic_samples=SHARDS * PER_SHARD, synthetic_classes=10,
                synthetic_image_size=32, samples_per_shard=PER_SHARD, progress=False)  # fmt: skip
    return root


def _overrides(source: Path, run_dir: Path, **extra: object) -> list[str]:
    base = {
        "data.source": source, "data.eval_source": "null", "data.batch_size": 8, "data.workers": 0,
        "data.open_shards": 1, "data.shuffle_buffer": 256, "data.max_bad_fraction": FRACTION,
        "trainer.run_dir": run_dir, "trainer.max_steps": 10, "trainer.global_batch": 16,
        "trainer.checkpoint_every": 0, "trainer.log_every": 2, "trainer.tensorboard": False,
        "trainer.progress": False, "trainer.ema_decay": 0.0,
    }  # fmt: skip
    base.update(extra)
    return [f"++{k}={v}" for k, v in base.items()] + ["~synthetic_data", *TINY_MODEL]  # ++: set or add


def _torchrun(overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "defocus_scale.train", *overrides]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _shards_by_rank(overrides: list[str]) -> list[dict[int, tuple[int, int]]]:
    """Per rank, the shards its epoch-0 share reads (as the trainer deals them): shard -> first sample."""
    from defocus_scale.data.loader import build_train_loader
    from defocus_scale.train.config import load_train_config

    cfg = load_train_config(overrides)
    shares = []
    for rank in range(2):
        loader = build_train_loader(cfg.data, rank=rank, world_size=2, seed=cfg.trainer.seed)
        stream = loader.stream
        units = [u for i in range(stream.num_substreams) for u in stream.substream_state(i)["pending"]]
        shares.append({int(u[0]): int(u[1]) for u in units})
    return shares


def _damaged_copy(
    clean: Path, target: Path, truncate: list[int], garble: dict[int, int] | None = None
) -> None:
    """A copy of the shards with ``truncate`` cut to 40% of their bytes and, per ``garble`` entry, three
    images of that shard from that sample on overwritten in place with zeros (sizes and offsets kept)."""
    shutil.copytree(clean, target)
    tars = sorted(target.glob("*.tar"))
    for shard in truncate:
        os.truncate(tars[shard], tars[shard].stat().st_size * 2 // 5)
    for shard, first in (garble or {}).items():
        with tarfile.open(tars[shard]) as archive:
            images = [m for m in archive.getmembers() if m.name.rsplit(".", 1)[-1] in ("png", "jpg", "webp")]
        with open(tars[shard], "r+b") as handle:
            for member in images[first : first + 3]:
                handle.seek(member.offset_data)
                handle.write(b"\0" * member.size)


def _urls(source: Path, shards: list[int]) -> list[str]:
    tars = sorted(source.glob("*.tar"))
    return sorted(str(tars[s]) for s in shards)


@pytest.mark.distributed
def test_bad_shards_over_the_limit_only_globally_stop_both_ranks(clean_shards: Path, tmp_path: Path) -> None:
    """Two bad shards on each rank: each rank alone is within 0.25 x 10, the four together are not. The
    check before the step-1 checkpoint stops both ranks, with one and the same one-line message."""
    source, run_dir = tmp_path / "shards", tmp_path / "run"
    overrides = _overrides(source, run_dir, **{"trainer.checkpoint_every": 1, "trainer.log_every": 5})
    shutil.copytree(clean_shards, source)
    shares = _shards_by_rank(overrides)
    exclusive = [sorted(set(mine) - set(other)) for mine, other in (shares, shares[::-1])]
    bad = exclusive[0][:2] + exclusive[1][:2]
    assert len(bad) == 4 and all(len(set(bad) & set(s)) <= FRACTION * SHARDS for s in shares), shares
    shutil.rmtree(source)
    _damaged_copy(clean_shards, source, bad)
    done = _torchrun(overrides)
    assert done.returncode != 0, done.stderr[-4000:]
    found = dict(re.findall(r"^rank (\d): (?:training stopped|terminated by \w+ while failing with): "
                            r"ShardReadError: (.*)$", done.stderr, flags=re.MULTILINE))  # fmt: skip
    assert sorted(found) == ["0", "1"], done.stderr[-6000:]
    assert found["0"] == found["1"], found
    urls = ", ".join(_urls(source, bad))
    assert found["0"] == (f"step 1, epoch 0, over all 2 ranks: 4 of 10 shards (40.0%) are missing or "
                          f"corrupt, more than data.max_bad_fraction={FRACTION} allows: {urls}")  # fmt: skip
    assert not list(run_dir.rglob(COMMIT_MARKER))  # stopped before the step-1 save


@pytest.mark.distributed
def test_bad_data_within_the_limit_is_logged_and_summarised(clean_shards: Path, tmp_path: Path) -> None:
    """One truncated shard per rank (2 of 10: within the limit) and three undecodable images: the run
    completes; the step table's boundary rows and the summary carry the global figures."""
    from defocus_scale.train.report import read_metrics

    source, run_dir = tmp_path / "shards", tmp_path / "run"
    overrides = _overrides(source, run_dir)
    shutil.copytree(clean_shards, source)
    shares = _shards_by_rank(overrides)
    exclusive = [sorted(set(mine) - set(other)) for mine, other in (shares, shares[::-1])]
    bad, garbled = [exclusive[0][0], exclusive[1][0]], exclusive[0][1]
    shutil.rmtree(source)
    _damaged_copy(clean_shards, source, bad, garble={garbled: shares[0][garbled]})
    done = _torchrun(overrides)
    assert done.returncode == 0, done.stderr[-6000:]
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["final_step"] == 10
    assert summary["data/bad_shards"] == 2 and summary["data/bad_shard_urls"] == _urls(source, bad)
    assert summary["data/bad_samples"] == 3 and summary["data/samples_delivered"] > 100
    rows = read_metrics(str(run_dir))
    assert [r["step"] for r in rows] == list(range(1, 11))
    # Every sample of a rank's share is in its shuffle buffer from the first batch: both bad shards are
    # known at the first read-back (step 2) already.
    boundaries = {r["step"]: r["data/bad_shards"] for r in rows if r["step"] % 2 == 0}
    assert boundaries == {2: 2, 4: 2, 6: 2, 8: 2, 10: 2}
    assert rows[-1]["data/bad_samples"] == 3
