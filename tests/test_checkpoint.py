"""The checkpointer in one gloo process: one stager for every async save, per-rank state files, run ids
(pruning never touches another run's checkpoints; a directory of two runs is refused, not resumed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from defocus_scale.train import checkpoint as checkpoint_module
from defocus_scale.train.checkpoint import (
    COMMIT_MARKER,
    TRAINER_STATE,
    Checkpointer,
    CheckpointError,
    CheckpointStore,
    TrainState,
    rank_state_name,
    rng_state,
)


def _state() -> TrainState:
    model = torch.nn.Linear(4, 2)
    return TrainState(model, torch.optim.AdamW(model.parameters()), None)


def test_one_stager_serves_every_async_save(world_of_one, tmp_path: Path, monkeypatch) -> None:
    made, closed = [], []

    class CountingStager(checkpoint_module.DefaultStager):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def close(self) -> None:
            closed.append(self)
            super().close()

    monkeypatch.setattr(checkpoint_module, "DefaultStager", CountingStager)
    store = CheckpointStore(str(tmp_path))
    checkpointer = Checkpointer(store, keep_last=2, async_save=True, rank=0)
    state = _state()
    for step in (1, 2, 3):
        checkpointer.save(step, state, {"step": step}, {"loader": {"at": step}, "rng": rng_state()})
        checkpointer.wait()
    assert len(made) == 1 and not closed
    checkpointer.close()
    assert closed == made
    assert store.steps() == [2, 3] and store.newest_complete() == (3, [])
    marker = json.loads((Path(store.path(3)) / COMMIT_MARKER).read_text())
    assert marker["run_id"] == checkpointer.run_id and rank_state_name(0) in marker["files"]
    shared = store.read_json(3, TRAINER_STATE)
    assert shared["run_id"] == checkpointer.run_id and shared["world_size"] == 1
    assert "loader" not in shared  # per-rank state lives in the rank's own file
    assert store.read_json(3, rank_state_name(0))["loader"] == {"at": 3}


def test_a_missing_rank_state_makes_the_checkpoint_unusable(world_of_one, tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    checkpointer = Checkpointer(store, keep_last=3, async_save=False, rank=0)
    checkpointer.save(4, _state(), {"step": 4}, {"loader": {}, "rng": rng_state()})
    folder = Path(store.path(4))
    (folder / rank_state_name(0)).unlink()
    marker = json.loads((folder / COMMIT_MARKER).read_text())
    del marker["files"][rank_state_name(0)]  # hand-edited to match: trainer_state.json's world size says 1
    (folder / COMMIT_MARKER).write_text(json.dumps(marker))
    assert store.problem(4) == f"file {rank_state_name(0)} is missing (1 rank state file(s) in all)"
    with pytest.raises(CheckpointError, match="rank_00000"):
        store.commit(4)


def test_runs_keep_to_their_own_checkpoints(world_of_one, tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    first = Checkpointer(store, keep_last=1, async_save=False, rank=0)
    assert first.open_run(resume=True) is None  # nothing to resume: a new run
    for step in (10, 20):
        first.save(step, _state(), {"step": step})
    assert store.steps() == [20]
    with pytest.raises(CheckpointError, match="trainer.resume=false.*steps 20"):
        Checkpointer(store, keep_last=1, async_save=False, rank=0).open_run(resume=False)

    again = Checkpointer(store, keep_last=1, async_save=False, rank=0)
    assert again.open_run(resume=True) == 20 and again.run_id == first.run_id

    # A second run's checkpoints in the same directory (copied in, or an override of the refusal): its
    # pruning leaves the first run's alone, and neither is resumed from.
    intruder = Checkpointer(store, keep_last=1, async_save=False, rank=0)
    intruder.open_run(resume=False, refuse_existing=False)
    for step in (5, 6):
        intruder.save(step, _state(), {"step": step})
    assert store.steps() == [6, 20] and store.run_id(6) == intruder.run_id != first.run_id
    with pytest.raises(CheckpointError, match=f"2 runs .*{first.run_id}|2 runs .*{intruder.run_id}"):
        Checkpointer(store, keep_last=1, async_save=False, rank=0).open_run(resume=True)


def test_rank_states_read_back_own_or_all(world_of_one, tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    store.write_json(8, TRAINER_STATE, {"step": 8, "world_size": 3, "run_id": "r"})
    for rank in range(3):
        store.write_json(8, rank_state_name(rank), {"rank": rank, "loader": {"of": rank}})
    shared = store.read_json(8, TRAINER_STATE)
    same = Checkpointer(store, keep_last=1, async_save=False, rank=0, world_size=3)
    assert same.read_rank_states(8, shared) == [{"rank": 0, "loader": {"of": 0}}]
    elastic = Checkpointer(store, keep_last=1, async_save=False, rank=0)  # a world of one now
    assert [s["loader"] for s in elastic.read_rank_states(8, shared)] == [{"of": r} for r in range(3)]
    legacy = {"world_size": 2, "loader_states": [{"a": 0}, {"a": 1}], "rng_states": [{"t": 0}, {"t": 1}]}
    assert elastic.read_rank_states(8, legacy) == [
        {"rank": 0, "loader": {"a": 0}, "rng": {"t": 0}}, {"rank": 1, "loader": {"a": 1}, "rng": {"t": 1}},
    ]  # fmt: skip


def test_ranks_that_do_not_share_storage_are_named(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).parent / "dist_scripts" / "storage_probe.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    printed = [line for rank in (0, 1) if (tmp_path / f"outcome-{rank}.txt").exists()
               for line in (tmp_path / f"outcome-{rank}.txt").read_text().splitlines()]  # fmt: skip
    lines = {tuple(line.split(":")[0].split()): line for line in printed}
    assert done.returncode == 0 and len(lines) == 8, "\n".join(printed) + done.stderr[-3000:]
    for rank in ("0", "1"):
        assert lines["rank", rank, "shared"].endswith("ok, probes left []")
        assert lines["rank", rank, "nowhere"].endswith("ok, probes left []")
        memory, data = lines["rank", rank, "memory"], lines["rank", rank, "data"]
        assert "ConfigError the ranks do not share storage: rank 1 on" in memory, memory
        assert "does not see /run/.shared-storage-probe-" in memory and "rank 0 on" not in memory, memory
        assert "rank 1 on" in data and "does not see data.source=" in data and "rank 0 on" not in data, data


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_is_one_error_naming_the_checkpoint(world_of_one, tmp_path: Path, async_save) -> None:
    """DCP wraps a rank's write error in a CheckpointException (a BaseException); the checkpointer turns
    it into an OSError that keeps ENOSPC (not worth a restart) and names the folder."""
    import errno

    from torch.distributed.checkpoint import FileSystemWriter

    from defocus_scale.train.cli import worth_a_restart

    class FullDisk(FileSystemWriter):
        def write_data(self, plan, planner):
            raise OSError(errno.ENOSPC, "No space left on device")

    store = CheckpointStore(str(tmp_path))
    store.writer = lambda step: FullDisk(store.path(step))
    checkpointer = Checkpointer(store, keep_last=2, async_save=async_save, rank=0)
    with pytest.raises(OSError) as failure:
        checkpointer.save(5, _state(), {"step": 5})
        checkpointer.wait()
    assert failure.value.errno == errno.ENOSPC and store.path(5) in str(failure.value), failure.value
    assert not worth_a_restart(failure.value)
    assert store.newest_complete() == (None, [(5, "no commit marker (the save did not finish)")])
    checkpointer.close(abandon=True)


def test_a_failed_record_write_names_the_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    """The orchestration's records in the run directory (progress, failures, restarts) on a full disk."""
    import errno

    from defocus_scale.orchestration.storage import RunStorage

    storage = RunStorage(str(tmp_path))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.fs, "mv", full)
    with pytest.raises(OSError) as failure:
        storage.write_json({"step": 3}, "orchestration", "progress.json")
    assert failure.value.errno == errno.ENOSPC
    assert failure.value.filename == str(tmp_path / "orchestration" / "progress.json")
    assert list((tmp_path / "orchestration").iterdir()) == []


def test_a_failed_load_is_one_error_naming_the_checkpoint(world_of_one, tmp_path: Path) -> None:
    """A read error inside DCP's load (an object store failing mid-read): an OSError naming the folder (it
    may pass: retried), not DCP's CheckpointException, which ``except Exception`` does not catch."""
    import errno

    from torch.distributed.checkpoint import FileSystemReader

    from defocus_scale.train.cli import worth_a_restart

    store = CheckpointStore(str(tmp_path))
    checkpointer = Checkpointer(store, keep_last=2, async_save=False, rank=0)
    checkpointer.save(3, _state(), {"step": 3})

    class FailingRead(FileSystemReader):
        def read_data(self, plan, planner):
            raise OSError(errno.EIO, "Input/output error")

    store.reader = lambda step: FailingRead(store.path(step))
    with pytest.raises(OSError) as failure:
        checkpointer.load(3, _state())
    assert failure.value.errno == errno.EIO
    assert f"while loading checkpoint {store.path(3)}" in str(failure.value)
    assert worth_a_restart(failure.value)
