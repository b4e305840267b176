"""Recovery on local Ray: time from a worker's death to the first step after resume, steps lost per failure,
and the start-up overhead of Ray versus torchrun for the same short job.

Jobs: a tiny De-focus Mamba (embed 32, depth 2, 16 px) on synthetic shards, 2 CPU workers, one epoch of
8 steps, checkpoints every 2 steps. Recovery runs SIGKILL rank 1 after step ``--kill-step`` (repeated
``--repeats`` times, each a fresh run). The overhead compares the wall time of the whole fault-free
job (start-up included) under each launcher; Ray's time includes starting its local instance.

The trainer is the real one (the orchestration's TRAINER_ENTRY, ``defocus_scale.train``) unless
``--entry module:function`` names another (``--entry-path``: its folder, if not installed).

Node loss: ``tests/dist_scripts/node_loss.py`` on a 3-node ``ray.cluster_utils.Cluster`` (a head without
CPUs, two 1-CPU worker nodes), a 4-epoch job of the same model paced at 0.3 s a step, one worker node
removed at step 6. ``elastic`` (1..2 workers): the group goes on with 1 worker, then grows back when a node
returns; ``fixed``: it restarts on 2 workers once a replacement node is up (5 s later). Node death is
detected by 3 missed 1 s GCS health checks, the worker group start times out after 15 s.

    python benchmarks/bench_recovery.py [--repeats 3] [--kill-step 5] [--skip-node-loss]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
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

REPO = Path(__file__).resolve().parents[1]

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


def node_loss_rows(root: Path, cfg: dict) -> list[dict]:
    """One run of the node-loss drill per mode; its restarts (recovery seconds, steps lost, world sizes)."""
    script = REPO / "tests" / "dist_scripts" / "node_loss.py"
    job = {**cfg, "trainer": {**cfg["trainer"], "max_steps": 4 * STEPS, "audit_samples": True}}
    (root / "node_loss_cfg.json").write_text(json.dumps(job))
    rows = []
    for mode in ("elastic", "fixed"):
        storage = root / f"node_loss_{mode}"
        storage.mkdir()
        done = subprocess.run(
            [sys.executable, str(script), mode, str(storage), str(root / "node_loss_cfg.json")],
            cwd=script.parent, capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        line = next((x for x in done.stdout.splitlines() if x.startswith("{")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"node-loss drill ({mode}) failed:\n{done.stderr[-4000:]}")
        report = json.loads(line)
        once = set(report["consumed"].values()) == {4}
        for record in report["restarts"]:
            rows.append({"mode": mode, "cause": record["cause"][:80], "recovery_s": record["recovery_s"],
                         "steps_lost": record["steps_lost"], "world_size_before": record["world_size_before"],
                         "world_size_after": record["world_size_after"], "every_sample_once_per_epoch": once,
                         "job_wall_s": report["wall_s"]})  # fmt: skip
    return rows


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
    parser.add_argument("--skip-node-loss", action="store_true", help="no multi-node Ray cluster drill")
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
        node_loss = [] if args.skip_node_loss else node_loss_rows(root, cfg)

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
    if node_loss:
        losses = Table(title="Node loss on a 3-node Ray cluster (one worker node removed at step 6)")
        for column in ("mode", "restart cause", "workers", "recovery s", "steps lost", "each sample once"):
            losses.add_column(column, justify="left" if column in ("mode", "restart cause") else "right")
        for row in node_loss:
            workers = f"{row['world_size_before']} -> {row['world_size_after']}"
            losses.add_row(row["mode"], row["cause"][:50], workers, f"{row['recovery_s']:.1f}",
                           str(row["steps_lost"]), str(row["every_sample_once_per_epoch"]))  # fmt: skip
        console.print(losses)
    path = write_result("bench_recovery", {
        "job": {"model": "defocus_mamba_tiny embed 32 depth 2, 16 px", "workers": args.workers,
                "steps": STEPS, "global_batch": GLOBAL_BATCH, "checkpoint_every": 2, "entry": args.entry},
        "wall_s": wall,
        "ray_overhead_s": wall["ray"] - wall["torchrun"],
        "restarts": [r.__dict__ for r in restarts],
        "recovery_s_median": statistics.median(recovery),
        "steps_lost": lost,
        "node_loss": node_loss,
        "note": "recovery_s = injected death (SIGKILL) to the first completed step after resume: Ray's "
                "failure detection (health poll 0.5 s), worker-group restart, process-group setup, "
                "checkpoint load and one step; node_loss: detection settings in the module docstring",
    }, args.out)
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
