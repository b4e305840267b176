"""Ray/torchrun launching, fault injection and recovery, elastic resume (CPU, local Ray).

The launch tests drive the real trainer (``defocus_scale.train.train_in_process_group``, the
orchestration's ``TRAINER_ENTRY``) on a tiny De-focus Mamba, with ``trainer.audit_samples`` on so that
every checkpoint lists the keys of the samples consumed so far: the exactly-once audit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from defocus_scale.orchestration.config import (
    ClusterConfig,
    FaultConfig,
    LauncherConfig,
    OrchestrationConfig,
    plan_batch,
)
from defocus_scale.orchestration.faults import corrupt_checkpoint
from defocus_scale.orchestration.recovery import FailureNote, RecoveryTracker, write_failure_note
from defocus_scale.orchestration.storage import RunStorage
from defocus_scale.orchestration.trainer_adapter import (
    COMPLETE_MARKER,
    TRAINER_ENTRY,
    list_complete_checkpoints,
    newest_complete_checkpoint,
    prepare_trainer_config,
    resolve_entry,
)

SAMPLES, CLASSES, IMAGE = 96, 10, 16
GLOBAL_BATCH, STEPS = 12, 8  # one epoch: 96 samples = 8 steps of 12
TINY_MAMBA = {"embed_dim": 32, "depth": 2, "inner_dim": 64, "dt_rank": 4, "group_size": 16, "patch_size": 4}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from defocus_scale.data.make_shards import make_shards

    out = tmp_path_factory.mktemp("orchestration") / "shards"
    make_shards("synthetic", out, samples_per_shard=12, synthetic_samples=SAMPLES, synthetic_classes=CLASSES,
                synthetic_image_size=IMAGE, progress=False)
    return out


@pytest.fixture(scope="module")
def ray_local():
    """One small local Ray instance for the module (4 logical CPUs: up to 3 workers plus slack)."""
    ray = pytest.importorskip("ray")
    from defocus_scale.orchestration.launch import ray_session

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    with ray_session(ClusterConfig(num_cpus=4, object_store_memory=80 * 2**20)):
        yield ray
    assert not ray.is_initialized()


def _trainer_cfg(shards: Path, stop_at_step: int | None = None, checkpoint_every: int = 2) -> dict:
    """The real trainer's config (merged onto configs/train.yaml): synchronous saves, so that which
    checkpoint is complete when a fault strikes does not depend on timing."""
    data = dict(source=str(shards), eval_source=None, num_classes=CLASSES, image_size=IMAGE, workers=0,
                shuffle_buffer=8, open_shards=2, mixup=0.0, cutmix=0.0, auto_augment=None, reprob=0.0)
    trainer = dict(seed=3, max_steps=STEPS, stop_at_step=stop_at_step, checkpoint_every=checkpoint_every,
                   global_batch=GLOBAL_BATCH, async_save=False, audit_samples=True, ema_decay=0.9,
                   tensorboard=False, progress=False, threads=1, log_every=100, eval_every=0)
    model = {"name": "defocus_mamba_tiny", "overrides": TINY_MAMBA}
    return {"model": model, "data": data, "trainer": trainer, "schedule": {"warmup_steps": 2}}


def _orchestration(storage: Path, workers: int = 2, kind: str = "ray", **faults) -> OrchestrationConfig:
    return OrchestrationConfig(
        launcher=LauncherConfig(kind=kind, num_workers=workers, max_failures=2, health_check_interval_s=0.5),
        faults=FaultConfig(enabled=bool(faults), **faults),
        storage_path=str(storage),
        run_name="run",
    )


def _final_params(run_dir: str) -> dict[str, torch.Tensor]:
    """Live weights of the newest checkpoint (the trainer always saves at its last step)."""
    from safetensors.torch import load_file

    from defocus_scale.train import export_checkpoint

    out = Path(run_dir) / "final.safetensors"
    export_checkpoint(run_dir, out)
    return load_file(out)


def _consumed_keys(run_dir: str) -> list[str]:
    newest = newest_complete_checkpoint(RunStorage(run_dir))
    return json.loads((Path(run_dir) / newest / "trainer_state.json").read_text())["consumed_keys"]


def _all_keys(shards: Path) -> Counter:
    """Every sample key of the shards, once each (a tar member name is ``key.extension``)."""
    import tarfile

    keys = set()
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as archive:
            keys.update(name.split(".", 1)[0] for name in archive.getnames())
    assert len(keys) == SAMPLES
    return Counter(keys)


def _assert_same_params(a: dict, b: dict) -> None:
    """Same seed, same data order, RNG states restored from the checkpoint: the replayed steps redo the
    same arithmetic on CPU, so the weights agree to the last bits (a tolerance of a few ulps is left for
    gloo's reduction order)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def reference_run(ray_local, shards, tmp_path_factory):
    """2 workers, 8 steps, no faults."""
    from defocus_scale.orchestration.launch import launch

    orchestration = _orchestration(tmp_path_factory.mktemp("reference"))
    result = launch(orchestration, _trainer_cfg(shards))
    assert result.summary["final_step"] == STEPS and result.restarts == []
    return result


# ----------------------------------------------------------------------------- unit tests (no Ray)


def test_plan_batch_keeps_global_batch() -> None:
    assert plan_batch(12, 1) == plan_batch(12, 1, None)
    for world, micro, accumulation in [(1, 12, 1), (2, 6, 1), (3, 4, 1), (4, 3, 1)]:
        plan = plan_batch(12, world)
        assert (plan.micro_batch, plan.accumulation) == (micro, accumulation)
    plan = plan_batch(12, 1, max_micro_batch=5)
    assert (plan.micro_batch, plan.accumulation) == (4, 3)
    assert plan.micro_batch * plan.accumulation * plan.world_size == 12
    with pytest.raises(ValueError, match="does not split over 5 workers"):
        plan_batch(12, 5, rounding="exact")
    assert (plan_batch(12, 5).global_batch, plan_batch(12, 5).requested) == (10, 12)
    assert plan_batch(12, 8).global_batch == 16 and plan_batch(12, 64).global_batch == 64  # halves up; >= 1


RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "recipe").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_has_a_batch_plan_at_every_world_size(recipe: str) -> None:
    """An elastic group may come up with any size: 1..64 workers each get a plan within half a rank's
    batch of the recipe's global batch, with micro-batches that fit ``max_micro_batch``."""
    from defocus_scale.train.config import load_train_config, resolve_batch

    cfg = load_train_config([f"+recipe={recipe}"])
    wanted, limit = cfg.trainer.global_batch, cfg.trainer.max_micro_batch
    assert wanted is not None
    for world in range(1, 65):
        plan = resolve_batch(cfg, world)
        assert plan.micro_batch * plan.accumulation * world == plan.global_batch
        assert abs(plan.global_batch - wanted) <= world / 2 or plan.global_batch == world, (world, plan)
        assert plan.micro_batch <= (limit or plan.global_batch) and plan.rounded == (wanted % world != 0)


def test_driver_checks_every_elastic_size_before_launch(tmp_path: Path) -> None:
    from defocus_scale.orchestration.cli import prepare_launch

    common = [f"trainer.run_dir={tmp_path / 'run'}", "trainer.global_batch=64", "launcher.min_workers=2",
              "launcher.max_workers=6"]  # fmt: skip
    prepared = prepare_launch(common)  # nearest: every size in 2..6 has a plan
    assert prepared.orchestration.launcher.elastic
    with pytest.raises(ValueError, match=r"does not split over \[3, 5, 6\] workers"):
        prepare_launch([*common, "trainer.global_batch_rounding=exact"])


def test_prepare_trainer_config_sets_batch_and_run_dir() -> None:
    cfg, plan = prepare_trainer_config({"trainer": {"global_batch": 12}, "data": {"batch_size": 99}},
                                       run_dir="runs/x", world_size=3)
    assert cfg["trainer"]["run_dir"] == "runs/x"
    assert (cfg["data"]["batch_size"], cfg["trainer"]["grad_accum_steps"]) == (4, 1)
    assert plan is not None and plan.world_size == 3


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="launcher.kind"):
        LauncherConfig(kind="slurm")
    with pytest.raises(ValueError, match="min_workers"):
        LauncherConfig(min_workers=2)
    with pytest.raises(ValueError, match="cluster.address"):
        ClusterConfig(address="10.0.0.1:6379")
    with pytest.raises(ValueError, match="faults.kill_step"):
        FaultConfig(kill_rank=1)
    with pytest.raises(ValueError, match="launcher.num_wrkers"):
        OrchestrationConfig.from_mapping({"launcher": {"num_wrkers": 2}})
    parsed = OrchestrationConfig.from_mapping({"launcher": {"kind": "torchrun"}, "storage_path": "s3://b/r"})
    assert parsed.launcher.kind == "torchrun" and parsed.run_dir == "s3://b/r/defocus"


def test_recovery_tracker_records_restart(tmp_path: Path) -> None:
    storage = RunStorage(str(tmp_path))
    first = RecoveryTracker(storage, rank=0, world_size=2, launch_id="L")
    first.on_resume(0)
    for step in range(1, 6):
        assert first.on_step_end(step) is None  # a fresh start is not a restart
    first.close()  # progress is written behind the steps; the dead launch's last one is on record
    write_failure_note(storage, FailureNote(time=1.0, cause="boom", source="injector", rank=1, step=5))
    second = RecoveryTracker(storage, rank=0, world_size=3, launch_id="L")
    second.on_resume(4)
    record = second.on_step_end(5)
    assert record is not None
    assert (record.restart, record.last_step, record.resumed_from_step, record.steps_lost) == (1, 5, 4, 1)
    assert (record.world_size_before, record.world_size_after, record.failed_at) == (2, 3, 1.0)
    assert "boom" in record.cause and storage.list_files("orchestration", "failures") == []
    assert second.restarts_so_far() == 1
    # A new launch resuming the same run (e.g. with fewer workers) is not a restart.
    third = RecoveryTracker(storage, rank=0, world_size=1, launch_id="M")
    third.on_resume(6)
    assert third.on_step_end(7) is None


def test_corrupt_checkpoint_and_listing(tmp_path: Path) -> None:
    storage = RunStorage(str(tmp_path))
    for step in (2, 10, 4):
        folder = tmp_path / "checkpoints" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "__0_0.distcp").write_bytes(b"x" * 100)
        (folder / ".metadata").write_bytes(b"m")
        (folder / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoints" / "step_000012").mkdir()  # incomplete: no commit marker
    (tmp_path / "checkpoints" / "step_000012" / ".metadata").write_bytes(b"m")
    assert list_complete_checkpoints(storage) == [f"checkpoints/step_{s:06d}" for s in (2, 4, 10)]
    damaged = corrupt_checkpoint(storage, newest_complete_checkpoint(storage))
    assert damaged.endswith("step_000010/__0_0.distcp")
    assert (tmp_path / "checkpoints" / "step_000010" / "__0_0.distcp").stat().st_size == 50


# ----------------------------------------------------------------------------- launches (local Ray)


@pytest.mark.distributed
def test_sigkilled_worker_recovers_and_matches_uninterrupted_run(reference_run, shards, tmp_path) -> None:
    from defocus_scale.orchestration.launch import launch

    # Checkpoints at steps 2, 4; rank 1 dies right after step 5, so step 5 is redone from step 4.
    result = launch(_orchestration(tmp_path, kill_rank=1, kill_step=5), _trainer_cfg(shards))
    assert result.summary["final_step"] == STEPS
    assert len(result.restarts) == 1
    restart = result.restarts[0]
    assert "SIGKILL of rank 1 at step 5" in restart.cause
    assert (restart.last_step, restart.resumed_from_step, restart.steps_lost) == (5, 4, 1)
    assert 0 < restart.recovery_s < 120
    _assert_same_params(_final_params(result.run_dir), _final_params(reference_run.run_dir))
    assert Counter(_consumed_keys(result.run_dir)) == _all_keys(shards)  # each sample once in the epoch


@pytest.mark.distributed
def test_corrupted_newest_checkpoint_falls_back_to_previous(reference_run, shards, tmp_path) -> None:
    from defocus_scale.orchestration.launch import launch

    # After step 5 the newest checkpoint (step 4) is damaged and rank 0 is killed: resume from step 2.
    orchestration = _orchestration(tmp_path, kill_rank=0, kill_step=5, corrupt_checkpoint_at_step=5)
    result = launch(orchestration, _trainer_cfg(shards))
    assert result.summary["final_step"] == STEPS
    restart = result.restarts[0]
    assert (restart.resumed_from_step, restart.steps_lost) == (2, 3)
    _assert_same_params(_final_params(result.run_dir), _final_params(reference_run.run_dir))
    assert Counter(_consumed_keys(result.run_dir)) == _all_keys(shards)


@pytest.fixture(scope="module")
def half_run(ray_local, shards, tmp_path_factory) -> Path:
    """2 workers stop after 4 of the epoch's 8 steps (checkpoint at step 4)."""
    from defocus_scale.orchestration.launch import launch

    result = launch(_orchestration(tmp_path_factory.mktemp("half")), _trainer_cfg(shards, stop_at_step=4))
    assert result.summary["final_step"] == 4
    return Path(result.run_dir)


@pytest.mark.distributed
@pytest.mark.parametrize("workers", [1, 3])
def test_resume_two_worker_run_with_other_worker_count(half_run, shards, tmp_path, workers) -> None:
    from defocus_scale.orchestration.launch import launch

    shutil.copytree(half_run, tmp_path / "run")
    result = launch(_orchestration(tmp_path, workers=workers), _trainer_cfg(shards))
    assert result.summary["world_size"] == workers and result.summary["final_step"] == STEPS
    assert result.summary["resumed_from"] == "checkpoints/step_00000004" and result.restarts == []
    assert Counter(_consumed_keys(result.run_dir)) == _all_keys(shards)  # same epoch, any worker count


@pytest.mark.distributed
def test_torchrun_launcher_runs_the_same_job(reference_run, shards, tmp_path) -> None:
    from defocus_scale.orchestration.launch import launch

    result = launch(_orchestration(tmp_path, kind="torchrun"), _trainer_cfg(shards))
    assert result.launcher == "torchrun" and result.summary["final_step"] == STEPS
    _assert_same_params(_final_params(result.run_dir), _final_params(reference_run.run_dir))


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["ray", "torchrun"])
def test_nonfinite_streak_stops_the_launch_without_restarts(ray_local, shards, tmp_path, kind) -> None:
    """Every launcher path: a run of NaN losses stops the job with the trainer's message, and no restart
    is spent replaying the same batches."""
    from defocus_scale.orchestration.launch import launch
    from defocus_scale.orchestration.recovery import read_restart_records

    cfg = _trainer_cfg(shards)
    cfg["trainer"].update(inject_nonfinite_at=[3, 4], max_nonfinite_steps=2)
    orchestration = _orchestration(tmp_path, kind=kind)
    with pytest.raises(RuntimeError, match=r"not retried.*stopped at step 4.*trainer.skip_steps=\[3,4\]"):
        launch(orchestration, cfg)
    assert read_restart_records(orchestration.run_dir) == []
    assert (Path(orchestration.run_dir) / "nonfinite_steps.json").exists()


def test_missing_inputs_are_named_before_any_worker_starts(shards, tmp_path) -> None:
    """A misspelt data path or an unwritable run directory: one error naming the key, from the driver."""
    from defocus_scale.orchestration.cli import prepare_launch
    from defocus_scale.train.config import ConfigError

    base = ["~synthetic_data", f"data.source={shards}", "data.eval_source=null",
            f"trainer.run_dir={tmp_path / 'run'}"]  # fmt: skip
    prepare_launch(base)
    with pytest.raises(ConfigError, match=r"data.source=.*trian.*(no such|exist|names no)"):
        prepare_launch([*base, f"data.source={tmp_path / 'trian'}"])
    with pytest.raises(ConfigError, match="data.eval_source="):
        prepare_launch([*base, f"data.eval_source={tmp_path / 'val-missing'}"])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="trainer.run_dir=.*cannot be written"):
        prepare_launch([*base, f"trainer.run_dir={tmp_path / 'a-file' / 'run'}"])
    with pytest.raises(ConfigError, match="trainer.init_from=.*does not exist"):
        prepare_launch([*base, f"trainer.init_from={tmp_path / 'nothing.safetensors'}"])


def test_relative_paths_are_made_absolute_on_the_driver(shards, tmp_path, monkeypatch) -> None:
    """Ray's workers run in a per-session working directory: relative data, run and init paths are
    resolved against the driver's before launch; URLs and interpolations are left alone."""
    from defocus_scale.orchestration.cli import prepare_launch
    from defocus_scale.orchestration.trainer_adapter import absolute_paths

    monkeypatch.chdir(shards.parent)
    prepared = prepare_launch(["~synthetic_data", f"data.source={shards.name}", "data.eval_source=null",
                               "trainer.run_dir=runs/relative"])  # fmt: skip
    assert prepared.trainer_cfg["data"]["source"] == str(shards)
    assert prepared.trainer_cfg["trainer"]["run_dir"] == str(shards.parent / "runs" / "relative")
    assert prepared.orchestration.run_dir == str(shards.parent / "runs" / "relative")
    cfg = {"data": {"source": "s3://bucket/train", "eval_source": "${trainer.run_dir}/val"},
           "trainer": {"init_from": "../w.safetensors", "run_dir": "/abs"}}  # fmt: skip
    assert absolute_paths(cfg, "/base/dir") == {"trainer.init_from": "/base/w.safetensors"}
    assert cfg["data"] == {"source": "s3://bucket/train", "eval_source": "${trainer.run_dir}/val"}


@pytest.mark.distributed
def test_missing_data_in_the_workers_is_not_retried(shards, tmp_path) -> None:
    """Past the driver's check (a launch through the API), a worker's missing-input error ends the launch
    at once with its message instead of spending every restart on it."""
    from defocus_scale.orchestration.launch import launch
    from defocus_scale.orchestration.recovery import read_restart_records

    cfg = _trainer_cfg(shards)
    cfg["data"]["source"] = str(tmp_path / "misspelt")
    orchestration = _orchestration(tmp_path, kind="torchrun")
    with pytest.raises(RuntimeError, match=r"not retried.*FileNotFoundError.*misspelt"):
        launch(orchestration, cfg)
    assert read_restart_records(orchestration.run_dir) == []


def environment_entry(cfg, hooks) -> dict:
    """A trainer entry reporting the flight recorder's settings as the worker sees them."""
    prefix = os.environ.get("TORCH_FR_DUMP_TEMP_FILE", "")
    return {"prefix": prefix, "folder_exists": os.path.isdir(os.path.dirname(prefix)),
            "dump_on_timeout": os.environ.get("TORCH_NCCL_DUMP_ON_TIMEOUT")}  # fmt: skip


@pytest.mark.distributed
def test_ray_workers_get_the_flight_recorder_settings(ray_local, shards, tmp_path) -> None:
    from defocus_scale.orchestration.launch import launch

    orchestration = _orchestration(tmp_path, workers=1)
    summary = launch(orchestration, _trainer_cfg(shards), entry=environment_entry).summary
    assert summary["prefix"] == os.path.join(orchestration.run_dir, "flight_recorder", "rank_"), summary
    assert summary["folder_exists"] and summary["dump_on_timeout"] == "1"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["ray", "torchrun"])
def test_a_killed_driver_stops_its_workers_promptly(tmp_path, kind) -> None:
    import signal
    import subprocess
    import sys
    import time

    script = Path(__file__).parent / "dist_scripts" / "dead_driver.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "driver.log", "wb")  # noqa: SIM115 -- closed in the finally below
    driver = subprocess.Popen([sys.executable, str(script), kind, str(tmp_path)], env=env, cwd=tmp_path,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    pids_folder = tmp_path / "run" / "pids"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(list(pids_folder.glob("*"))) < 2 and driver.poll() is None:
            time.sleep(0.5)
        workers = [int(p.name) for p in pids_folder.glob("*")]
        assert len(workers) == 2, (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(2)  # training is under way
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed = time.monotonic()
        while any(_alive(pid) for pid in workers) and time.monotonic() - killed < 60:
            time.sleep(0.2)
        outlived = time.monotonic() - killed
        assert not any(_alive(pid) for pid in workers), f"workers alive {outlived:.0f} s after the driver"
        assert outlived < 15, outlived
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # what is left of the driver's session (Ray's processes)
        except ProcessLookupError:
            pass
        log.close()


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["elastic", "fixed"])
def test_node_loss_on_a_multi_node_cluster(shards, tmp_path, mode) -> None:
    """A 3-node Ray cluster on this machine (``tests/dist_scripts/node_loss.py``), one worker node killed
    at step 6 of a 4-epoch job. Elastic (1..2 workers): the group goes on with 1 worker, then grows back
    to 2 when a node returns (a resize, not charged to the failure budget). Fixed: the group restarts on 2
    workers once a replacement node is up. Either way every sample is consumed once per epoch."""
    import subprocess
    import sys

    cfg = _trainer_cfg(shards)
    cfg["trainer"]["max_steps"] = 4 * STEPS
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    script = Path(__file__).parent / "dist_scripts" / "node_loss.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), mode, str(tmp_path), str(tmp_path / "cfg.json")],
                          env=env, cwd=script.parent, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    line = next((x for x in done.stdout.splitlines() if x.startswith("{")), None)
    assert done.returncode == 0 and line is not None, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(line)
    assert report["summary"]["final_step"] == 4 * STEPS and report["summary"]["global_batch"] == GLOBAL_BATCH
    assert report["consumed"] == {key: 4 for key in _all_keys(shards)}
    kinds = [(a["kind"], a["world_size"]) for a in report["attempts"]]
    first = report["restarts"][0]
    assert first["world_size_before"] == 2 and first["last_step"] >= 6 and first["steps_lost"] <= 2
    if mode == "elastic":
        assert kinds == [("start", 2), ("failure", 1), ("resize", 2)], kinds
        assert report["restarts"][1]["cause"] == "elastic resize by Ray (no failure)"
    else:
        assert kinds == [("start", 2), ("failure", 2)], kinds
    assert report["summary"]["world_size"] == 2


def failing_entry(cfg, hooks) -> dict:
    """A trainer entry whose every attempt fails with an ordinary (retryable) error."""
    raise RuntimeError("boom from the entry")


@pytest.mark.distributed
def test_ray_failure_is_one_message_naming_the_workers_error(ray_local, shards, tmp_path) -> None:
    import dataclasses

    from defocus_scale.orchestration.launch import launch

    orchestration = _orchestration(tmp_path)
    orchestration = dataclasses.replace(
        orchestration, launcher=dataclasses.replace(orchestration.launcher, max_failures=0)
    )
    with pytest.raises(RuntimeError) as failure:
        launch(orchestration, _trainer_cfg(shards), entry=failing_entry)
    message = str(failure.value)
    assert "max_failures=0" in message and "RuntimeError: boom from the entry" in message, message
    assert "Traceback" not in message and failure.value.__cause__ is None


@pytest.mark.distributed
def test_failure_budget_per_window_ends_a_crash_loop(ray_local, shards, tmp_path) -> None:
    """Under a time window Ray is told to restart without limit; the workers' budget ends the launch at
    the start after the (max_failures + 1)-th failure, with the worker's own error in the message."""
    import dataclasses

    from defocus_scale.orchestration.launch import launch
    from defocus_scale.orchestration.recovery import read_attempts

    orchestration = _orchestration(tmp_path)
    launcher = dataclasses.replace(orchestration.launcher, max_failures=1, failure_window_s=600.0)
    orchestration = dataclasses.replace(orchestration, launcher=launcher)
    with pytest.raises(RuntimeError) as failure:
        launch(orchestration, _trainer_cfg(shards), entry=failing_entry)
    message = str(failure.value)
    assert "failure budget spent: 2 failures within 600 s" in message, message
    assert "launcher.max_failures=1" in message and "RuntimeError: boom from the entry" in message, message
    assert [a.kind for a in read_attempts(orchestration.run_dir)] == ["start", "failure", "failure"]


def test_failure_budget_counts_failures_in_the_window_only(tmp_path: Path) -> None:
    from defocus_scale.orchestration.recovery import (
        FAILURES,
        FOLDER,
        PREEMPTION,
        read_attempts,
        spend_failure_budget,
    )

    storage = RunStorage(str(tmp_path))

    def start(at: float, note: str | None = None, *, silent_failed: bool = False) -> str | None:
        for name in storage.list_files(FOLDER, FAILURES):  # the tracker clears notes once recovered
            storage.delete(FOLDER, FAILURES, name)
        if note is not None:
            write_failure_note(storage, FailureNote(at - 1, f"{note} cause", note, rank=0))
        return spend_failure_budget(storage, launch_id="L", world_size=2, max_failures=2, window_s=1000.0,
                                    silent_restarts_failed=silent_failed, now=at)[1]  # fmt: skip

    assert start(0) is None
    assert start(100, "trainer") is None and start(200, "ray-controller") is None  # 2 failures: allowed
    assert start(300, PREEMPTION) is None and start(400) is None  # a preemption, a resize: not charged
    assert start(1500, "trainer") is None  # 100 and 200 are out of the window by now
    assert start(1600, "trainer") is None
    stopped = start(1700, None, silent_failed=True)  # torchrun: a restart without a note is a failure
    assert stopped is not None and "3 failures within 1000 s" in stopped and "without a note" in stopped
    kinds = [a.kind for a in read_attempts(str(tmp_path))]
    assert kinds == ["start", "failure", "failure", "preemption", "resize", "failure", "failure", "failure"]


def test_preemption_is_read_from_rays_error() -> None:
    from defocus_scale.orchestration.recovery import is_preemption

    class ActorDied(Exception):
        preempted = True

    class HealthCheckFailed(Exception):
        def __init__(self, inner: Exception) -> None:
            self.health_check_failure = inner

    assert is_preemption(ActorDied()) and is_preemption(HealthCheckFailed(ActorDied()))
    assert not is_preemption(RuntimeError("boom")) and not is_preemption(HealthCheckFailed(RuntimeError()))


def test_trainer_entry_resolves() -> None:
    assert resolve_entry(TRAINER_ENTRY).__name__ == "train_in_process_group"


@pytest.mark.parametrize("launcher", ["ray", "torchrun"])
@pytest.mark.parametrize("cluster", ["local", "auto"])
@pytest.mark.parametrize("faults", ["none", "drill"])
def test_yaml_groups_parse(launcher: str, cluster: str, faults: str) -> None:
    from omegaconf import OmegaConf

    configs = Path(__file__).resolve().parents[1] / "configs"
    parsed = OrchestrationConfig.from_mapping({
        group: OmegaConf.to_container(OmegaConf.load(configs / group / f"{name}.yaml"))
        for group, name in [("launcher", launcher), ("cluster", cluster), ("faults", faults)]
    })
    assert (parsed.launcher.kind, parsed.faults.enabled) == (launcher, faults == "drill")
    assert parsed.cluster.address == (None if cluster == "local" else "auto")


@pytest.mark.distributed
def test_elastic_group_starts_with_the_workers_it_can_get(ray_local, shards, tmp_path) -> None:
    """min 1, max 3 workers of 1.5 CPUs on a 4-CPU Ray: 2 fit, and the global batch stays 12."""
    from defocus_scale.orchestration.launch import launch

    orchestration = _orchestration(tmp_path)
    orchestration.launcher = LauncherConfig(kind="ray", num_workers=2, min_workers=1, max_workers=3,
                                            cpus_per_worker=1.5, max_failures=1, health_check_interval_s=0.5)
    result = launch(orchestration, _trainer_cfg(shards))
    assert result.summary["world_size"] == 2 and result.summary["final_step"] == STEPS
    assert result.summary["global_batch"] == GLOBAL_BATCH and result.summary["micro_batch"] == 6
    assert Counter(_consumed_keys(result.run_dir)) == _all_keys(shards)
