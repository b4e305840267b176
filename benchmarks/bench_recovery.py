"""Recovery on local Ray: time from a worker's death to the first step after resume, steps lost per failure,
and the start-up overhead of Ray versus torchrun for the same short job.

Jobs: a tiny De-focus Mamba (embed 32, depth 2, 16 px) on synthetic shards, 2 CPU workers, one epoch of
8 steps, checkpoints every 2 steps. Recovery runs SIGKILL rank 1 after step ``--kill-step`` (repeated
``--repeats`` times, each a fresh run). The overhead compares the wall time of the whole fault-free
job (start-up included) under each launcher; Ray's time includes starting its local instance.

The trainer is the real one (the orchestration's TRAINER_ENTRY, ``defocus_scale.train``) unless
``--entry module:function`` names another (``--entry-path``: its folder, if not installed).

    python benchmarks/bench_recovery.py [--repeats 3] [--kill-step 5]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import write_result  # noqa: E402

from defocus_scale.data.make_shards import make_shards  # noqa: E402
from defocus_scale.orchestration.config import (  # noqa: E402
    ClusterConfig,
    FaultConfig,
    LauncherConfig,
    OrchestrationConfig,
)
from defocus_scale.orchestration.launch import launch, ray_session  # noqa: E402
from defocus_scale.orchestration.trainer_adapter import TRAINER_ENTRY  # noqa: E402

SAMPLES, CLASSES, IMAGE, GLOBAL_BATCH, STEPS = 96, 10, 16, 12, 8


def trainer_config(shards: Path) -> dict:
    """The trainer's config (merged onto configs/train.yaml): synchronous saves, no evaluation, EMA on."""
    data = dict(source=str(shards), eval_source=None, num_classes=CLASSES, image_size=IMAGE, workers=0,
                shuffle_buffer=8, open_shards=2, mixup=0.0, cutmix=0.0, auto_augment=None, reprob=0.0)
    trainer = dict(seed=3, max_steps=STEPS, checkpoint_every=2, global_batch=GLOBAL_BATCH, async_save=False,
                   ema_decay=0.9, tensorboard=False, progress=False, threads=1, log_every=100, eval_every=0)
    model = {"name": "defocus_mamba_tiny", "overrides": {"embed_dim": 32, "depth": 2, "inner_dim": 64,
             "dt_rank": 4, "group_size": 16, "patch_size": 4}}  # fmt: skip
    return {"model": model, "data": data, "trainer": trainer}


def orchestration(
    storage: Path, kind: str, workers: int, faults: FaultConfig, cpus: int
) -> OrchestrationConfig:
    return OrchestrationConfig(
        launcher=LauncherConfig(kind=kind, num_workers=workers, max_failures=2, health_check_interval_s=0.5),
        cluster=ClusterConfig(num_cpus=cpus, object_store_memory=80 * 2**20),
        faults=faults,
        storage_path=str(storage),
        run_name="run",
    )


def resolve(entry: str, entry_path: str | None):
    if entry_path is None:
        return entry
    sys.path.insert(0, str(Path(entry_path).resolve()))
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", default=TRAINER_ENTRY)
    parser.add_argument("--entry-path", default=None, help="folder of --entry's module, if not installed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-step", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    entry = resolve(args.entry, args.entry_path)
    console = Console()
    cpus = args.workers + 1

    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as folder:
        root = Path(folder)
        make_shards("synthetic", root / "shards", samples_per_shard=12, synthetic_samples=SAMPLES,
                    synthetic_classes=CLASSES, synthetic_image_size=IMAGE, progress=False)
        cfg = trainer_config(root / "shards")
        wall: dict[str, float] = {}
        for kind in ("torchrun", "ray"):  # Ray last: its wall time includes starting and stopping Ray
            run = orchestration(root / kind, kind, args.workers, FaultConfig(), cpus)
            start = time.perf_counter()
            if kind == "ray":
                with ray_session(run.cluster):
                    ray_ready = time.perf_counter()
                    result = launch(run, cfg, entry)
                wall["ray_start_s"] = ray_ready - start
            else:
                result = launch(run, cfg, entry)
            wall[kind] = time.perf_counter() - start
            assert result.summary.get("final_step") == STEPS, result.summary

        restarts = []
        with ray_session(ClusterConfig(num_cpus=cpus, object_store_memory=80 * 2**20)):
            for repeat in range(args.repeats):
                faults = FaultConfig(enabled=True, kill_rank=1, kill_step=args.kill_step)
                run = orchestration(root / f"kill{repeat}", "ray", args.workers, faults, cpus)
                result = launch(run, cfg, entry)
                assert result.summary.get("final_step") == STEPS and len(result.restarts) == 1, result
                restarts.append(result.restarts[0])

    recovery = [r.recovery_s for r in restarts]
    lost = [r.steps_lost for r in restarts]
    table = Table(title=f"Recovery and launcher overhead: {args.workers} CPU workers, {STEPS}-step job")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("torchrun job wall time (s)", f"{wall['torchrun']:.1f}")
    table.add_row("Ray job wall time incl. ray.init/shutdown (s)", f"{wall['ray']:.1f}")
    table.add_row("  of which ray.init (s)", f"{wall['ray_start_s']:.1f}")
    table.add_row("Ray overhead vs torchrun (s)", f"{wall['ray'] - wall['torchrun']:.1f}")
    table.add_row(f"recovery time, SIGKILL at step {args.kill_step} (s, median of {len(recovery)})",
                  f"{statistics.median(recovery):.1f}")
    table.add_row("recovery time min / max (s)", f"{min(recovery):.1f} / {max(recovery):.1f}")
    table.add_row("steps lost per failure", ", ".join(str(n) for n in lost))
    console.print(table)
    path = write_result("bench_recovery", {
        "job": {"model": "defocus_mamba_tiny embed 32 depth 2, 16 px", "workers": args.workers,
                "steps": STEPS, "global_batch": GLOBAL_BATCH, "checkpoint_every": 2, "entry": args.entry},
        "wall_s": wall,
        "ray_overhead_s": wall["ray"] - wall["torchrun"],
        "restarts": [r.__dict__ for r in restarts],
        "recovery_s_median": statistics.median(recovery),
        "steps_lost": lost,
        "note": "recovery_s = injected death (SIGKILL) to the first completed step after resume: Ray's "
                "failure detection (health poll 0.5 s), worker-group restart, process-group setup, "
                "checkpoint load and one step",
    }, args.out)
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
