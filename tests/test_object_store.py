"""Shards, checkpoints, metrics, export and eval on an S3-compatible object store: moto's standalone server,
started here on 127.0.0.1, reached over HTTP through s3fs (the client stack a cluster job uses)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = [
    "model.overrides.embed_dim=32", "model.overrides.depth=2", "model.overrides.inner_dim=64",
    "model.overrides.dt_rank=4", "model.overrides.group_size=16", "model.overrides.patch_size=8",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server of this module's own; the environment that points boto/s3fs at it (also set in
    this process for the module's duration)."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    saved = {key: os.environ.get(key) for key in env}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        os.environ.update(env)
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bucket")
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(30)


def _without_rendezvous(env: os._Environ | dict) -> dict[str, str]:
    """The environment minus torch.distributed's rendezvous variables (an in-process group of an earlier
    test may have left some), so a child process makes its own group."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return {k: v for k, v in env.items() if k not in names}


def _s3():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


@pytest.fixture(scope="module")
def s3_shards(s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Train and validation shards written straight to the store by ``make_shards``."""
    from defocus_scale.data.make_shards import make_shards

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))  # a URL mistaken for a path would appear here
    try:
        summary = make_shards("synthetic", "s3://bucket/shards/train", synthetic_samples=384,
                              synthetic_classes=10, synthetic_image_size=32, samples_per_shard=32,
                              progress=False)  # fmt: skip
        make_shards("synthetic", "s3://bucket/shards/val", synthetic_samples=64, synthetic_classes=10,
                    synthetic_image_size=32, samples_per_shard=32, seed=1, progress=False)  # fmt: skip
        assert os.listdir(".") == []
    finally:
        os.chdir(cwd)
    assert summary.shards == 12 and summary.out_dir == "s3://bucket/shards/train"
    return "s3://bucket/shards"


def test_make_shards_writes_to_the_store(s3_shards: str) -> None:
    from defocus_scale.data.make_shards import make_shards

    names = sorted(p.rsplit("/", 1)[-1] for p in _s3().ls("bucket/shards/train"))
    assert names == ["classes.json", "manifest.parquet"] + [f"train-{i:06d}.tar" for i in range(12)]
    with pytest.raises(FileExistsError, match="already holds shards"):
        make_shards("synthetic", f"{s3_shards}/train", synthetic_samples=8, progress=False)


def test_remote_directory_resolves_with_and_without_a_manifest(s3_shards: str) -> None:
    from defocus_scale.data.stream import resolve_shards

    with_manifest = resolve_shards(f"{s3_shards}/train")
    assert [s.samples for s in with_manifest] == [32] * 12
    assert with_manifest[0].url == f"{s3_shards}/train/train-000000.tar"
    fs = _s3()
    fs.copy("bucket/shards/train", "bucket/shards/bare", recursive=True)
    fs.rm("bucket/shards/bare/manifest.parquet")
    bare = resolve_shards(f"{s3_shards}/bare")
    assert [s.url.rsplit("/", 1)[-1] for s in bare] == [s.url.rsplit("/", 1)[-1] for s in with_manifest]
    assert all(s.samples is None for s in bare)


def test_index_shards_rebuilds_a_remote_manifest_and_reads_seek(s3_shards: str, capsys) -> None:
    """`defocus-scale index-shards` on a prefix whose manifest is gone writes it again, equal to the one
    make_shards wrote, reading only tar headers; iter_shard with its offsets fetches only the samples read."""
    from defocus_scale.cli import main
    from defocus_scale.data.manifest import read_manifest
    from defocus_scale.data.tar_reader import READS, iter_shard

    fs = _s3()
    fs.copy("bucket/shards/train", "bucket/shards/reindexed", recursive=True)
    fs.rm("bucket/shards/reindexed/manifest.parquet")
    with READS.measure() as indexing:
        assert main(["index-shards", f"{s3_shards}/reindexed", "--workers", "4"]) == 0
    assert f"wrote {s3_shards}/reindexed/manifest.parquet" in capsys.readouterr().out
    original = read_manifest(f"{s3_shards}/train").to_pylist()
    assert read_manifest(f"{s3_shards}/reindexed").to_pylist() == original
    assert indexing.bytes < 0.3 * sum(row["bytes"] for row in original)

    row = original[5]
    url, offsets = f"{s3_shards}/reindexed/{row['shard']}", row["offsets"]
    for case in ({"start": 28, "stop": 30}, {"start": 31}, {"picks": [3, 17, 18]}):
        expected = list(iter_shard(url, **case))
        with READS.measure() as ranged:
            assert list(iter_shard(url, **case, offsets=offsets)) == expected
        assert ranged.bytes < 0.15 * row["bytes"], (case, ranged.bytes, row["bytes"])
    with READS.measure() as ranged:
        list(iter_shard(url, 28, 30, offsets=offsets))
    assert ranged.bytes == offsets[30] - offsets[28]  # the two samples' bytes, no more


def _train(env: dict[str, str], shards: str, run_dir: str, **extra: object) -> subprocess.CompletedProcess:
    settings = {
        "data.source": f"{shards}/train", "data.eval_source": f"{shards}/val", "data.batch_size": 8,
        "data.workers": 1, "trainer.run_dir": run_dir, "trainer.max_steps": 8, "trainer.checkpoint_every": 4,
        "trainer.global_batch": 16, "trainer.audit_samples": True, "trainer.tensorboard": False,
        "trainer.progress": False, "trainer.ema_decay": 0.9, **extra,
    }  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "defocus_scale.train", *[f"{k}={v}" for k, v in settings.items()], "~synthetic_data",
               *TINY_MODEL]  # fmt: skip
    run_env = {**_without_rendezvous(os.environ), **env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=400)


def _summary(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-20000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


def test_training_streams_from_and_checkpoints_to_the_store(
    s3_env: dict[str, str], s3_shards: str, tmp_path: Path
) -> None:
    """Two ranks read their shards from the store and write DCP checkpoints and metrics to it; a second
    launch resumes there, every training sample is drawn exactly once per epoch (the audit), and export and
    eval read the run straight from the store."""
    run_dir = "s3://bucket/runs/first"
    stopped = _summary(_train(s3_env, s3_shards, run_dir, **{"trainer.stop_at_step": 4}))
    assert stopped["final_step"] == 4
    resumed = _summary(_train(s3_env, s3_shards, run_dir, **{"trainer.max_steps": 24}))
    assert resumed["resumed_from"] == "checkpoints/step_00000004" and resumed["final_step"] == 24
    fs = _s3()
    assert fs.exists("bucket/runs/first/checkpoints/step_00000024/COMMITTED.json")
    assert fs.glob("bucket/runs/first/metrics/train/*.parquet")

    from defocus_scale.train.checkpoint import TRAINER_STATE, CheckpointStore

    store = CheckpointStore(run_dir)
    consumed = store.read_json(24, TRAINER_STATE)["consumed_keys"]
    per_epoch = 384  # 24 steps x 16 = one epoch of the 384 samples
    assert len(consumed) == per_epoch and len(set(consumed)) == per_epoch

    from defocus_scale.train.export import export_checkpoint

    exported = tmp_path / "model.safetensors"
    export_checkpoint(run_dir, exported, ema=True)
    assert exported.stat().st_size > 0
    done = subprocess.run(
        [sys.executable, "-m", "defocus_scale.cli", "eval", run_dir, f"{s3_shards}/val", "--ema"],
        cwd=REPO, env={**_without_rendezvous(os.environ), **s3_env}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert scores["images"] == 64 and abs(scores["loss"] - resumed["eval_ema/loss"]) < 1e-4, scores


@pytest.mark.distributed
def test_ray_run_on_the_store_survives_a_killed_rank(s3_env: dict[str, str], s3_shards: str) -> None:
    """`defocus-scale train` through Ray with the run directory (checkpoints, restart records, results) on
    the store: rank 1 is SIGKILLed at step 3, the group restarts from the step-2 checkpoint read back from
    the store, and every sample is still drawn exactly once."""
    pytest.importorskip("ray")
    run_dir = "s3://bucket/runs/ray"
    settings = {
        "data.source": f"{s3_shards}/train", "data.eval_source": "null", "data.batch_size": 8,
        "data.workers": 0, "trainer.run_dir": run_dir, "trainer.max_steps": 6, "trainer.checkpoint_every": 2,
        "trainer.global_batch": 16, "trainer.audit_samples": True, "trainer.tensorboard": False,
        "trainer.progress": False, "launcher.num_workers": 2, "launcher.health_check_interval_s": 0.5,
        "faults.enabled": True, "faults.kill_rank": 1, "faults.kill_step": 3, "cluster.num_cpus": 4,
        # a synchronous save: the step-2 checkpoint is committed before step 3 can end (its collectives
        # wait for rank 0), so the kill always finds it; asynchronous, a loaded machine could still be
        # writing it then, and the run would (rightly) restart from step 0
        "trainer.async_save": False,
    }  # fmt: skip
    command = [sys.executable, "-m", "defocus_scale.cli", "train", "~synthetic_data", *TINY_MODEL,
               *[f"{k}={v}" for k, v in settings.items()]]  # fmt: skip
    env = {**_without_rendezvous(os.environ), **s3_env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-20000:]

    from defocus_scale.orchestration.recovery import read_restart_records
    from defocus_scale.train.checkpoint import TRAINER_STATE, CheckpointStore

    restarts = read_restart_records(run_dir)
    assert len(restarts) == 1 and restarts[0].resumed_from_step == 2, restarts
    consumed = CheckpointStore(run_dir).read_json(6, TRAINER_STATE)["consumed_keys"]
    assert len(consumed) == 6 * 16 and len(set(consumed)) == len(consumed)
