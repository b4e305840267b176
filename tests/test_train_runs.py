"""End-to-end trainer runs: 2-rank gloo FSDP2 on CPU via ``torchrun -m defocus_scale.train``.

Runs are shared by module-scoped fixtures: a straight run of 2N steps; N steps then stop; its resume to
2N on 2 ranks (must equal the straight run) and on 1 rank (resharded, global batch kept)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
from safetensors.torch import load_file

from defocus_scale.schedules import DropPathSchedule
from defocus_scale.train.checkpoint import COMMIT_MARKER, CheckpointStore
from defocus_scale.train.export import export_checkpoint, load_exported

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10-subset"
N = 4  # steps before the stop; the straight run does 2N

TINY_MODEL = [
    "model.overrides.embed_dim=32", "model.overrides.depth=2", "model.overrides.inner_dim=64",
    "model.overrides.dt_rank=4", "model.overrides.group_size=16", "model.overrides.patch_size=8",
]  # fmt: skip


def torchrun(nproc: int, overrides: list[str], timeout: float = 240) -> dict:
    """Run the trainer under torchrun; returns rank 0's summary (the JSON printed last)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "defocus_scale.train", *overrides]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"trainer failed ({done.returncode}):\n{done.stderr[-60000:]}")
    return json.loads(done.stdout[done.stdout.index("{") :])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from defocus_scale.data.make_shards import make_shards

    root = tmp_path_factory.mktemp("synthetic")
    make_shards("synthetic", root / "train", synthetic_samples=768, synthetic_classes=10,
                synthetic_image_size=32, samples_per_shard=64, progress=False)  # fmt: skip
    make_shards("synthetic", root / "val", synthetic_samples=128, synthetic_classes=10,
                synthetic_image_size=32, samples_per_shard=64, seed=1, progress=False)  # fmt: skip
    return root


def _overrides(shards: Path, run_dir: Path, **extra: object) -> list[str]:
    base = {
        "data.source": shards / "train", "data.eval_source": shards / "val", "data.batch_size": 8,
        "data.workers": 0, "trainer.run_dir": run_dir, "trainer.max_steps": 2 * N,
        "trainer.checkpoint_every": N, "trainer.eval_every": 0, "trainer.max_eval_batches": 2,
        "trainer.global_batch": 16, "trainer.tensorboard": False, "trainer.progress": False,
        "trainer.ema_decay": 0.9, "schedule.warmup_steps": 2,
        "schedule.drop_path.start": 0.05, "schedule.drop_path.end": 0.3,
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()] + ["~synthetic_data", *TINY_MODEL]


@pytest.fixture(scope="module")
def straight(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("straight")
    return run_dir, torchrun(2, _overrides(shards, run_dir))


@pytest.fixture(scope="module")
def stopped(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("stopped")
    return run_dir, torchrun(2, _overrides(shards, run_dir, **{"trainer.stop_at_step": N}))


def _resume_copy(stopped_dir: Path, name: str) -> Path:
    target = stopped_dir.parent / name
    shutil.copytree(stopped_dir, target)
    return target


def _live_weights(run_dir: Path, tmp: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    out = tmp / f"{run_dir.name}-{'ema' if ema else 'live'}.safetensors"
    export_checkpoint(str(run_dir), out, ema=ema)
    return load_file(out)


def test_loss_falls_on_synthetic_data(straight: tuple[Path, dict], shards: Path, tmp_path: Path) -> None:
    """With the paper's pooled aux head (the other runs use the released per-token one)."""
    run_dir = tmp_path / "longer"
    summary = torchrun(2, _overrides(shards, run_dir, **{
        "trainer.max_steps": 60, "trainer.checkpoint_every": 60, "optim.lr": 0.08, "data.mixup": 0.0,
        "data.cutmix": 0.0, "trainer.max_eval_batches": "null", "data.batch_size": 16,
        "trainer.global_batch": 32, "model.overrides.aux_head": "pooled",
    }))  # fmt: skip
    assert summary["final_step"] == 60 and summary["steps_run"] == 60
    assert summary["loss_last"] < summary["loss_first"] - 0.2, summary
    assert summary["eval/images"] == 128
    assert summary["eval/top1"] > 0.3, summary  # 10 classes: chance is 0.1


def test_resume_equals_straight_run(straight: tuple[Path, dict], stopped: tuple[Path, dict], shards: Path,
                                    tmp_path: Path) -> None:  # fmt: skip
    stopped_dir, stopped_summary = stopped
    assert stopped_summary["final_step"] == N
    resumed_dir = _resume_copy(stopped_dir, "resumed-2")
    summary = torchrun(2, _overrides(shards, resumed_dir))
    assert summary["resumed_from"] == f"checkpoints/step_{N:08d}" and summary["steps_run"] == N
    for ema in (False, True):
        expected, got = _live_weights(straight[0], tmp_path, ema), _live_weights(resumed_dir, tmp_path, ema)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_resume_two_ranks_to_one(stopped: tuple[Path, dict], shards: Path) -> None:
    """Same global batch (16) from 2 ranks x 8 to 1 rank x 4 micro-batches x 4 accumulation steps."""
    resumed_dir = _resume_copy(stopped[0], "resumed-1")
    summary = torchrun(1, _overrides(shards, resumed_dir, **{"trainer.max_micro_batch": 4}))
    assert summary["resumed_from"] == f"checkpoints/step_{N:08d}"
    assert summary["steps_run"] == N and summary["global_batch"] == 16
    assert (summary["micro_batch"], summary["accumulation"]) == (4, 4)
    assert summary["loss_last"] < 3.0 and len(summary["peak_memory_bytes_per_rank"]) == 1


def test_damaged_newest_checkpoint_is_skipped(straight: tuple[Path, dict], shards: Path) -> None:
    for damage in ("no_marker", "truncated"):
        run_dir = _resume_copy(straight[0], f"damaged-{damage}")
        newest = run_dir / "checkpoints" / f"step_{2 * N:08d}"
        if damage == "no_marker":  # killed after DCP wrote its files, before the commit
            (newest / COMMIT_MARKER).unlink()
        else:  # a shard file cut short after the commit
            shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        step, skipped = CheckpointStore(str(run_dir)).newest_complete()
        assert step == N and [s for s, _ in skipped] == [2 * N]
        if damage == "truncated":  # the trainer resumes from the previous one and finishes the run
            summary = torchrun(2, _overrides(shards, run_dir))
            assert summary["resumed_from"] == f"checkpoints/step_{N:08d}" and summary["steps_run"] == N


def test_fresh_run_refuses_a_directory_with_checkpoints(straight: tuple[Path, dict], shards: Path) -> None:
    """``trainer.resume=false`` in a directory holding an earlier run's checkpoints: one message, no
    traceback, and the old checkpoints untouched (a fresh run used to prune them as its own)."""
    run_dir = _resume_copy(straight[0], "reused")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    fresh = _overrides(shards, run_dir, **{"trainer.resume": False})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "defocus_scale.train", *fresh]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    message = next(line for line in done.stderr.splitlines() if "trainer.resume=false" in line)
    assert f"steps {N}, {2 * N}" in message and "training stopped" in message, message
    assert f'File "{REPO / "defocus_scale"}' not in done.stderr, done.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert CheckpointStore(str(run_dir)).newest_complete()[0] == 2 * N


def test_hsdp_two_by_two_resume_equals_straight_run(shards: Path, tmp_path: Path) -> None:
    """4 gloo ranks as 2 replicas x 2 shards (HSDP), 2 micro-batches a step reduce-scattered each: a run
    stopped at step N and resumed equals the straight run (replicas that drifted apart, e.g. initialised
    from different streams, would not: DCP saves one replica and the resume makes them equal)."""
    hsdp = {"trainer.dp_replicate": 2, "data.batch_size": 2, "trainer.max_micro_batch": 2}
    straight_dir, stopped_dir = tmp_path / "hsdp-straight", tmp_path / "hsdp-stopped"
    summary = torchrun(4, _overrides(shards, straight_dir, **hsdp))
    assert summary["mesh"] == {"dp_replicate": 2, "dp_shard": 2} and summary["accumulation"] == 2
    assert summary["placements"] == "R, S(0)"  # replicated across the 2 groups, sharded within
    torchrun(4, _overrides(shards, stopped_dir, **hsdp, **{"trainer.stop_at_step": N}))
    resumed = torchrun(4, _overrides(shards, stopped_dir, **hsdp))
    assert resumed["resumed_from"] == f"checkpoints/step_{N:08d}" and resumed["steps_run"] == N
    for ema in (False, True):
        expected, got = _live_weights(straight_dir, tmp_path, ema), _live_weights(stopped_dir, tmp_path, ema)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_eight_ranks_train_hsdp_with_the_other_knobs(shards: Path, tmp_path: Path) -> None:
    """8 gloo ranks on this CPU: HSDP 2 x 4 with units kept gathered (``reshard_after_forward=never``)
    and gradients held unsharded across micro-batches (``defer_gradient_sync``)."""
    common = {"trainer.max_steps": 3, "trainer.checkpoint_every": 3, "data.batch_size": 2,
              "trainer.max_micro_batch": 1}  # 16 = 8 ranks x 1 x 2 accumulation  # fmt: skip
    knobs = {"trainer.dp_replicate": 2, "trainer.reshard_after_forward": "never",
             "trainer.defer_gradient_sync": True}  # fmt: skip
    summary = torchrun(8, _overrides(shards, tmp_path / "r8-hsdp", **common, **knobs), timeout=420)
    assert summary["mesh"] == {"dp_replicate": 2, "dp_shard": 4} and summary["accumulation"] == 2
    assert summary["final_step"] == 3 and summary["loss_last"] < 3.0
    assert len(summary["peak_memory_bytes_per_rank"]) == 8


def test_steps_sync_the_host_only_at_log_boundaries(tmp_path: Path) -> None:
    """2 ranks, 2 micro-batches a step, 12 steps over two epochs, a checkpoint at step 6, logs every 5:
    an ordinary step makes no host sync (``item``/``tolist``/``bool``/... of any tensor on the training
    thread) and one collective of its own (the loss all-reduce; FSDP's are not counted); an epoch start
    adds one agreed plan; the figures come back in one ``tolist`` per logging window."""
    from defocus_scale.data.make_shards import make_shards

    make_shards("synthetic", tmp_path / "train", synthetic_samples=256, synthetic_classes=10,
                synthetic_image_size=32, samples_per_shard=64, progress=False)  # fmt: skip
    out = tmp_path / "counts.json"
    overrides = {
        "data.source": tmp_path / "train", "data.eval_source": "null", "data.batch_size": 8,
        "data.workers": 1,
        "trainer.run_dir": tmp_path / "run", "trainer.max_steps": 12, "trainer.checkpoint_every": 6,
        "trainer.global_batch": 32, "trainer.max_micro_batch": 8, "trainer.log_every": 5,
        "trainer.tensorboard": False, "trainer.progress": False,
    }  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "dist_scripts" / "count_syncs.py"), str(out),
               *[f"{k}={v}" for k, v in overrides.items()], "~synthetic_data", *TINY_MODEL]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    report = json.loads(out.read_text())
    steps = {int(k): v for k, v in report["steps"].items()}
    assert sorted(steps) == list(range(1, 13)) and report["summary"]["planned_epochs"] == 2
    # A step's counts run from the previous step's end: the read-back after steps 5, 6 (checkpoint), 10
    # lands in steps 6, 7, 11; epochs start at steps 1 and 9 (256 samples / 2 ranks / 16 per step).
    after_boundary, epoch_starts = {6, 7, 11}, {1, 9}
    for step, seen in steps.items():
        calls = seen["calls"]
        if step in after_boundary:
            assert any(c.startswith("syncs:tolist@step_log.py") for c in calls), (step, calls)
            continue
        # The second epoch's start also checks the finished epoch's bad data over all ranks (one all-reduce
        # and its read-back), for its last window, which no later read-back sees.
        epoch_check = [c for c in calls if "@bad_data.py" in c]
        assert len(epoch_check) == (2 if step == 9 else 0), (step, calls)
        calls = [c for c in calls if c not in epoch_check]
        syncs = [c for c in calls if c.startswith("syncs:") and "@loader.py" not in c]  # DataLoader seeding
        assert all("@batches.py" in c for c in syncs if step in epoch_starts), calls
        collectives = [c for c in calls if c.startswith("collectives:")]
        if step in epoch_starts:
            kinds = [c.split(":")[1].split("@")[0] for c in syncs]
            assert kinds == ["item"] and len(collectives) == 2, (step, calls)
        else:
            assert syncs == [] and len(collectives) == 1, (step, calls)
            assert collectives[0].startswith("collectives:all_reduce@loop.py"), (step, calls)


def test_drop_path_rate_per_step_follows_schedule(straight: tuple[Path, dict]) -> None:
    table = ds.dataset(straight[0] / "metrics" / "train", format="parquet").to_table().to_pylist()
    schedule = DropPathSchedule(0.05, 0.3, "linear")
    assert [row["step"] for row in table] == list(range(1, 2 * N + 1))
    for row in table:  # row "step" counts optimizer steps done; the rate was used for step - 1
        assert row["drop_path"] == pytest.approx(schedule.rate(row["step"] - 1, 2 * N), abs=1e-12)
    assert table[0]["drop_path"] == 0.05 and table[-1]["drop_path"] == pytest.approx(0.3)
    for key in ("loss", "loss_main", "loss_aux", "lr", "grad_norm", "images_per_s", "mfu", "peak_memory_gib"):
        assert all(row[key] is not None for row in table), key


def test_export_round_trip(straight: tuple[Path, dict], tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run_dir = straight[0]
    out = tmp_path / "model.safetensors"
    metadata = export_checkpoint(str(run_dir / "checkpoints" / f"step_{2 * N:08d}"), out)
    assert metadata["weights"] == "live" and metadata["step"] == str(2 * N)
    model = load_exported(out)
    # Independent reading of the same checkpoint with torch's own converter.
    dcp_to_torch_save(run_dir / "checkpoints" / f"step_{2 * N:08d}", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=False)["train"]["model"]
    state = model.state_dict()
    assert state.keys() == full.keys()
    for key, value in full.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.skipif(not CIFAR.exists(), reason="../shared/data/cifar10-subset is absent")
def test_loss_falls_on_cifar_subset(tmp_path: Path) -> None:
    from defocus_scale.data.make_shards import make_shards

    make_shards(CIFAR / "train", tmp_path / "train", samples_per_shard=512, progress=False)
    make_shards(CIFAR / "test", tmp_path / "val", samples_per_shard=512, prefix="val", progress=False)
    summary = torchrun(2, _overrides(tmp_path, tmp_path / "run", **{
        "trainer.max_steps": 60, "trainer.checkpoint_every": 60, "optim.lr": 0.08, "data.mixup": 0.0,
        "data.cutmix": 0.0, "data.batch_size": 32, "trainer.global_batch": 64, "schedule.warmup_steps": 4,
        "data.auto_augment": "null", "data.reprob": 0.0, "data.scale": "[0.6,1.0]",
    }))  # fmt: skip
    assert summary["loss_last"] < summary["loss_first"] - 0.1, summary


@pytest.mark.slow
def test_billion_parameter_model_trains_on_two_cpu_ranks(tmp_path: Path) -> None:
    """defocus_mamba_1b (1.0B parameters) at batch 1 per rank: built on meta, sharded, materialised shard by
    shard; parameters, gradients and AdamW state (16 GB in fp32) must fit this machine's 24 GiB in all.
    The EMA (another 4 GB) is off here; checkpoints too (they would write 12 GB)."""
    from defocus_scale.data.make_shards import make_shards

    make_shards("synthetic", tmp_path / "train", synthetic_samples=8, synthetic_classes=10,
                synthetic_image_size=224, samples_per_shard=4, progress=False)  # fmt: skip
    summary = torchrun(2, [
        "model=defocus_mamba_1b", f"data.source={tmp_path / 'train'}", "data.eval_source=null",
        "data.image_size=224", "data.batch_size=1", "data.workers=0", "~synthetic_data",
        f"trainer.run_dir={tmp_path / 'run'}", "trainer.max_steps=2", "trainer.checkpoint_every=0",
        "trainer.ema_decay=0", "trainer.activation_checkpointing=true", "trainer.tensorboard=false",
        "trainer.progress=false",
    ], timeout=1500)  # fmt: skip
    peaks = summary["peak_memory_bytes_per_rank"]
    print("peak RSS per rank (GiB):", [round(p / 2**30, 2) for p in peaks])
    assert summary["final_step"] == 2 and summary["loss_last"] == summary["loss_last"]  # finite, not NaN
    assert sum(peaks) < 24 * 2**30, peaks
