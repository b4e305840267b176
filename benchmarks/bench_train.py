"""Trainer benchmark: train-step throughput and MFU, per-rank memory under sharding, async vs sync saves.

1. images/s and MFU of one FSDP2 train step (forward, De-focus loss, backward, clipping, AdamW) for
   De-focus Mamba-S, RetNet-S and ViT-S beside timm's DeiT-S (``deit_small_patch16_224``, plain CE), in
   this process (a world of one), with the ratio to DeiT-S. FLOPs: FlopCounterMode on a meta copy
   (matmuls/convolutions; the scans' elementwise work is not counted). Peak: see ``peak_flops_source``.
   Then the production path, per model: fp32 eager, bf16 eager (the family's precision plan: bandpass
   scalars fp32) and fp32 compiled (``torch.compile`` per block) step times side by side, with the
   compile time (first step minus a steady step).
2. Peak memory per rank (RSS on CPU, allocated on GPU) of ``defocus-scale train`` under torchrun with 1 and
   2 ranks for defocus_mamba_base and defocus_mamba_1b (EMA off, no checkpoints).
3. Seconds the training loop is blocked by an async save versus a synchronous save of the same state
   (model, AdamW, EMA of defocus_mamba_base).
4. Host syncs (``Tensor.item``/``tolist``/... on the training thread) and ``torch.distributed`` calls of
   the trainer's own per ordinary step (not at a log, checkpoint or epoch boundary), and the median step
   time, at 2 gloo ranks under torchrun with 2 micro-batches a step (``tests/dist_scripts/count_syncs.py``);
   with ``--sync-baseline REV`` also for the trainer of an older commit, checked out in a temporary
   worktree, side by side (before/after). ``--host-syncs-only`` runs this part alone and writes
   ``results/bench_train_host_syncs.json``.

    python benchmarks/bench_train.py [--image-size 224] [--batch 8] [--skip-1b] [--sync-baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# first, before torch: it caps OpenMP's spin as in the CLI's processes (defocus_scale/__init__)
import defocus_scale  # noqa: F401

# isort: split
import timm
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import write_result  # noqa: E402

from defocus_scale.losses import defocus_loss  # noqa: E402
from defocus_scale.models import create_model  # noqa: E402
from defocus_scale.train.checkpoint import Checkpointer, CheckpointStore, TrainState  # noqa: E402
from defocus_scale.train.ema import ShardedEMA  # noqa: E402
from defocus_scale.train.metrics import peak_flops_per_device, train_flops_per_sample  # noqa: E402
from defocus_scale.train.optim import build_optimizer, clip_grad_norm  # noqa: E402
from defocus_scale.train.parallel import (  # noqa: E402
    build_sharded_model,
    init_distributed,
    mixed_precision_policy,
)

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT_MODELS = ["defocus_mamba_small", "defocus_retnet_small", "defocus_vit_small", "timm:deit_small"]


def _timm_deit(image_size: int) -> torch.nn.Module:
    return timm.create_model("deit_small_patch16_224", img_size=image_size, num_classes=1000)


def step_throughput(
    name: str, env, image_size: int, batch: int, steps: int, precision: str = "auto", compile: bool = False
) -> dict:
    """Median seconds of a full train step after one warm-up step."""
    policy = mixed_precision_policy(precision, env.device)
    if name.startswith("timm:"):
        with torch.device("meta"):
            model = _timm_deit(image_size)
        for block in model.blocks:
            fully_shard(block, mesh=env.mesh, mp_policy=policy)
        fully_shard(model, mesh=env.mesh, mp_policy=policy)
        model.to_empty(device=env.device)
        with torch.no_grad():
            model.init_weights()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, foreach=True)
        flops = train_flops_per_sample(lambda: _TimmAsClassifier(_timm_deit(image_size)), image_size)

        def loss_of(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(images).float(), labels)
    else:
        kwargs = {"img_size": image_size, "num_classes": 1000}
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()  # the compiled row's graph/break counts are its own
        model = build_sharded_model(name, kwargs, env, precision=precision, compile=compile)
        optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8)
        flops = train_flops_per_sample(lambda: create_model(name, **kwargs), image_size)

        def loss_of(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return defocus_loss(model.forward_train(images, drop_path_rate=0.1), labels).total

    model.train()
    images = torch.randn(batch, 3, image_size, image_size, device=env.device)
    labels = torch.randint(0, 1000, (batch,), device=env.device)
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for _ in range(steps + 1):
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss_of(images, labels).backward()
        clip_grad_norm(params, 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times[1:])[len(times[1:]) // 2]
    bf16 = policy.param_dtype == torch.bfloat16
    peak, _ = peak_flops_per_device(env.device, bf16)
    images_per_s = batch / seconds
    return {"model": name, "step_s": seconds, "images_per_s": images_per_s, "flops_per_sample": flops,
            "mfu": images_per_s * flops / peak, "first_step_s": times[0], "precision": precision,
            "compile": compile}  # fmt: skip


PRODUCTION_VARIANTS = [("fp32", False), ("bf16", False), ("fp32", True)]
PRODUCTION_NOTE = (
    "CPU bf16 rows depend on the CPU: without avx512_bf16/AMX, bf16 matmuls fall back to slow kernels (a "
    "1576x384 @ 384x1536 matmul measured 64x slower than fp32 on an AVX2 machine), with avx512_bf16 they are "
    "faster than fp32 (5x for that matmul); the run's CPU flags are in cpu_bf16; bf16 speed that matters is "
    "a GPU figure (benchmarks/gpu_checks.sh)"
)


def cpu_bf16_support() -> dict:
    """What this CPU offers bf16 matmuls: torch's vector ISA and the bf16 flags of ``/proc/cpuinfo``."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: the flags are unknown
        words = set()
    flags = {flag: flag in words for flag in ("avx512_bf16", "amx_bf16")} if words else {}
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), **flags}


def production_path(models: list[str], env, image_size: int, batch: int, steps: int) -> list[dict]:
    """fp32 eager / bf16 eager / fp32 compiled step times of each model, side by side in this process."""
    rows = []
    for name in models:
        eager = None
        for precision, compiled in PRODUCTION_VARIANTS:
            row = step_throughput(name, env, image_size, batch, steps, precision=precision, compile=compiled)
            eager = eager or row
            row["vs_fp32_eager"] = eager["step_s"] / row["step_s"]
            row["compile_s"] = row["first_step_s"] - row["step_s"] if compiled else None
            if compiled:
                from torch._dynamo.utils import counters

                row["graph_breaks"] = int(sum(counters["graph_break"].values()))
                row["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
            rows.append(row)
    return rows


class _TimmAsClassifier(torch.nn.Module):
    """timm's DeiT behind the trunk's training interface, for the FLOP counter's loss call."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward_train(self, images: torch.Tensor):
        from defocus_scale.models import ModelOutput

        return ModelOutput(self.model(images), None)


def peak_memory_runs(models: list[str], image_size: int, timeout: float) -> list[dict]:
    """``defocus-scale train`` under torchrun; batch 1 per rank, 2 steps, EMA and checkpoints off."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        from defocus_scale.data.make_shards import make_shards

        shards = Path(folder) / "shards"
        make_shards("synthetic", shards, synthetic_samples=16, synthetic_classes=10,
                    synthetic_image_size=image_size, samples_per_shard=4, progress=False)  # fmt: skip
        for name in models:
            for nproc in (1, 2):
                overrides = [
                    f"model={name}", f"data.source={shards}", "data.eval_source=null", "~synthetic_data",
                    f"data.image_size={image_size}", "data.batch_size=1", "data.workers=0",
                    f"trainer.run_dir={folder}/{name}-{nproc}", "trainer.max_steps=2",
                    "trainer.checkpoint_every=0", "trainer.ema_decay=0", "trainer.tensorboard=false",
                    "trainer.progress=false", "trainer.activation_checkpointing=true",
                ]  # fmt: skip
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "defocus_scale.train", *overrides]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                done = subprocess.run(
                    command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
                )
                if done.returncode != 0:
                    raise RuntimeError(f"{name} on {nproc} ranks failed:\n{done.stderr[-3000:]}")
                summary = json.loads(done.stdout[done.stdout.index("{") :])
                peaks = summary["peak_memory_bytes_per_rank"]
                rows.append({"model": name, "ranks": nproc, "peak_bytes_per_rank": peaks,
                             "max_peak_gib": max(peaks) / 2**30})  # fmt: skip
    return rows


def save_blocking(env, image_size: int) -> dict:
    """Blocked seconds of one async and one sync save of defocus_mamba_base's model + AdamW + EMA."""
    model = build_sharded_model("defocus_mamba_base", {"img_size": image_size}, env)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8)
    model.train()
    images = torch.randn(1, 3, image_size, image_size, device=env.device)
    defocus_loss(model.forward_train(images, drop_path_rate=0.0),
                 torch.zeros(1, dtype=torch.long, device=env.device)).total.backward()  # fmt: skip
    optimizer.step()  # AdamW's state exists from here on
    ema = ShardedEMA(model, 0.9999)
    state = TrainState(model, optimizer, ema)
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench-save-") as folder:
        for mode in ("sync", "async", "sync", "async"):  # the second of each counts (files cached, warm)
            store = CheckpointStore(f"{folder}/{mode}")
            checkpointer = Checkpointer(store, keep_last=1, async_save=mode == "async", rank=env.rank)
            # On CPU the state is copied inside save(); on GPUs the copy overlaps the next step's compute.
            blocked = checkpointer.save(1, state, {"step": 1}) + checkpointer.wait_for_staging()
            start = time.perf_counter()
            checkpointer.close()
            result[f"{mode}_blocked_s"] = blocked
            result[f"{mode}_total_s"] = blocked + time.perf_counter() - start
            store.remove(1)
    result["state_bytes"] = sum(p.numel() * 4 * 4 for p in model.parameters())  # params, 2 moments, EMA
    return result


SYNC_RUN = [  # 512 samples, 32 a step over 2 ranks x 2 micro-batches of 8: epochs of 16 steps, logs every 8
    "data.eval_source=null", "data.batch_size=8", "data.workers=1", "trainer.checkpoint_every=0",
    "trainer.global_batch=32", "trainer.max_micro_batch=8", "trainer.log_every=8",
    "trainer.tensorboard=false", "trainer.progress=false", "~synthetic_data",
    "model.overrides.embed_dim=32", "model.overrides.depth=2", "model.overrides.inner_dim=64",
    "model.overrides.dt_rank=4", "model.overrides.group_size=16", "model.overrides.patch_size=8",
]  # fmt: skip


def _count_syncs(label: str, tree: Path, root: Path, steps: int) -> dict:
    """Run the trainer of ``tree`` under count_syncs.py at 2 ranks; its per-ordinary-step figures."""
    import statistics

    out, run = root / f"counts-{tree.name}.json", root / f"run-{tree.name}"
    overrides = [f"data.source={root / 'train'}", f"trainer.run_dir={run}", f"trainer.max_steps={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "dist_scripts" / "count_syncs.py"), str(out), *overrides, *SYNC_RUN]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{label}: count_syncs failed\n{done.stderr[-4000:]}")
    counted = {int(k): v for k, v in json.loads(out.read_text())["steps"].items()}
    # Ordinary steps: not an epoch's first (every 16th from 1) nor right after a log read-back (9, 17, ...).
    ordinary = [s for s in counted if s > 1 and s % 16 != 1 and s % 8 != 1]
    return {
        "trainer": label, "ranks": 2, "micro_batches_per_step": 2, "ordinary_steps": len(ordinary),
        "host_syncs_per_step": statistics.median(counted[s]["syncs"] for s in ordinary),
        "collectives_per_step": statistics.median(counted[s]["collectives"] for s in ordinary),
        "step_s_median": statistics.median(counted[s]["time"] - counted[s - 1]["time"] for s in ordinary),
    }


def host_sync_rows(baseline: str | None, steps: int = 32) -> list[dict]:
    """Section 4: a row for an older commit's trainer (``baseline``, in a temporary worktree), then this
    tree's, run one after the other on the same shards."""
    from defocus_scale.data.make_shards import make_shards

    with tempfile.TemporaryDirectory(prefix="bench-syncs-") as folder:
        root = Path(folder)
        make_shards("synthetic", root / "train", synthetic_samples=512, synthetic_classes=10,
                    synthetic_image_size=32, samples_per_shard=64, progress=False)  # fmt: skip
        if not baseline:
            return [_count_syncs("after (this tree)", REPO, root, steps)]
        worktree = root / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), baseline],
                       check=True, capture_output=True)  # fmt: skip
        try:
            return [_count_syncs(f"before ({baseline})", worktree, root, steps),
                    _count_syncs("after (this tree)", REPO, root, steps)]  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)  # fmt: skip


def print_host_syncs(rows: list[dict], console: Console) -> None:
    table = Table(title="Per ordinary step, 2 gloo ranks, 2 micro-batches a step (tiny De-focus Mamba)")
    for column in ("trainer", "host syncs", "collectives (trainer's own)", "step s (median)"):
        table.add_column(column, justify="left" if column == "trainer" else "right")
    for row in rows:
        table.add_row(row["trainer"], f"{row['host_syncs_per_step']:g}", f"{row['collectives_per_step']:g}",
                      f"{row['step_s_median']:.3f}")  # fmt: skip
    console.print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=1, help="throughput: the models in turn N times, each keeps its fastest"
    )
    parser.add_argument("--memory-image-size", type=int, default=224)
    parser.add_argument("--skip-1b", action="store_true", help="memory runs for defocus_mamba_base only")
    parser.add_argument("--skip-memory", action="store_true", help="no torchrun memory runs (one GPU only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    parser.add_argument("--production-models", nargs="*", help="models of the fp32 / bf16 / compiled rows",
                        default=["defocus_vit_small", "defocus_mamba_small"])  # fmt: skip
    parser.add_argument("--sync-baseline", default=None, help="older commit for the before/after sync rows")
    parser.add_argument("--host-syncs-only", action="store_true", help="section 4 alone")
    parser.add_argument("--throughput-only", action="store_true",
                        help="section 1 alone, to results/bench_train_throughput.json")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=150)
    if args.host_syncs_only:
        rows = host_sync_rows(args.sync_baseline)
        print_host_syncs(rows, console)
        path = write_result("bench_train_host_syncs", {"settings": {"sync_baseline": args.sync_baseline},
                                                       "host_syncs": rows}, args.out)  # fmt: skip
        console.print(f"wrote {path}")
        return 0
    env = init_distributed()
    peak, peak_source = peak_flops_per_device(env.device, env.device.type == "cuda")

    # the models in turn, ``--rounds`` times; each keeps its fastest round: on a shared machine the load
    # drifts over minutes, and a ratio from one pass in order can read a quiet model against a loaded one
    rounds = [[step_throughput(n, env, args.image_size, args.batch, args.steps) for n in THROUGHPUT_MODELS]
              for _ in range(args.rounds)]  # fmt: skip
    throughput = [
        {**min(runs, key=lambda r: r["step_s"]), "rounds_step_s": [r["step_s"] for r in runs]}
        for runs in zip(*rounds, strict=True)
    ]
    reference = next(r for r in throughput if r["model"] == "timm:deit_small")
    table = Table(title=f"Train step, batch {args.batch} at {args.image_size} px, {env.device}")
    for column in ("model", "step s", "images/s", "vs DeiT-S", "GFLOP/sample", "MFU"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in throughput:
        row["images_per_s_vs_deit"] = row["images_per_s"] / reference["images_per_s"]
        table.add_row(row["model"], f"{row['step_s']:.2f}", f"{row['images_per_s']:.1f}",
                      f"{row['images_per_s_vs_deit']:.2f}", f"{row['flops_per_sample'] / 1e9:.1f}",
                      f"{row['mfu']:.1%}")  # fmt: skip
    console.print(table)
    console.print(f"MFU peak per device: {peak_source}")
    if args.throughput_only:
        torch.distributed.destroy_process_group()
        path = write_result("bench_train_throughput", {
            "settings": vars(args) | {"out": str(args.out) if args.out else None},
            "peak_flops_per_device": peak, "peak_flops_source": peak_source,
            "openmp_env": {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")},
            "throughput": throughput,
        }, args.out)  # fmt: skip
        console.print(f"wrote {path}")
        return 0

    production = production_path(args.production_models, env, args.image_size, args.batch, args.steps)
    prod_table = Table(title=f"Production path, batch {args.batch} at {args.image_size} px, {env.device}")
    for column in ("model", "precision", "compiled", "step s", "speed vs fp32 eager", "compile s",
                   "graph breaks"):  # fmt: skip
        prod_table.add_column(column, justify="left" if column == "model" else "right")
    for row in production:
        prod_table.add_row(row["model"], row["precision"], str(row["compile"]), f"{row['step_s']:.3f}",
                           f"{row['vs_fp32_eager']:.2f}x",
                           f"{row['compile_s']:.1f}" if row["compile_s"] is not None else "-",
                           str(row.get("graph_breaks", "-")))  # fmt: skip
    console.print(prod_table)

    saves = save_blocking(env, args.image_size)
    save_table = Table(
        title=f"Checkpoint save of defocus_mamba_base + AdamW + EMA ({saves['state_bytes'] / 2**30:.2f} GiB)"
    )
    for column in ("mode", "training blocked s", "until committed s"):
        save_table.add_column(column, justify="right")
    for mode in ("sync", "async"):
        save_table.add_row(mode, f"{saves[f'{mode}_blocked_s']:.2f}", f"{saves[f'{mode}_total_s']:.2f}")
    console.print(save_table)
    torch.distributed.destroy_process_group()

    host_syncs = host_sync_rows(args.sync_baseline)
    print_host_syncs(host_syncs, console)
    models = ["defocus_mamba_base"] + ([] if args.skip_1b else ["defocus_mamba_1b"])
    memory = [] if args.skip_memory else peak_memory_runs(models, args.memory_image_size, timeout=3000)
    memory_table = Table(title=f"Peak memory per rank, batch 1 at {args.memory_image_size} px (EMA off)")
    for column in ("model", "ranks", "per rank GiB", "ratio 1 rank / 2 ranks"):
        memory_table.add_column(column, justify="right")
    for row in memory:
        single = next(r for r in memory if r["model"] == row["model"] and r["ranks"] == 1)["max_peak_gib"]
        row["ratio_vs_one_rank"] = single / row["max_peak_gib"]
        memory_table.add_row(row["model"], str(row["ranks"]),
                             ", ".join(f"{p / 2**30:.2f}" for p in row["peak_bytes_per_rank"]),
                             f"{row['ratio_vs_one_rank']:.2f}")  # fmt: skip
    console.print(memory_table)
    path = write_result("bench_train", {
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "peak_flops_per_device": peak, "peak_flops_source": peak_source,
        "flops_note": "FlopCounterMode, forward+backward of one sample: matmuls and convolutions only",
        "throughput": throughput, "production_path": production, "production_note": PRODUCTION_NOTE,
        "cpu_bf16": cpu_bf16_support(), "save_blocking": saves,
        "peak_memory": memory, "host_syncs": host_syncs,
        "memory_note": "CPU: peak RSS per process (includes ~0.8 GiB of torch and libraries per process); "
                       "GPU: torch.cuda.max_memory_allocated",
    }, args.out)  # fmt: skip
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
