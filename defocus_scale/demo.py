"""``defocus-scale demo``: the README's main job. Build the built-in synthetic dataset's shards if missing,
train a small De-focus model with 2 Ray workers on CPU (sharded checkpoints, EMA, evaluation), then print a
summary: final accuracy, images/s, and where the checkpoints, metrics and loss-curve PNG are.

It is ``defocus-scale train`` with the overrides listed in ``configs/demo.yaml`` (command-line overrides
come after them and win)."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def demo_overrides(extra: list[str] | None = None, path: Path | None = None) -> list[str]:
    """The overrides of ``configs/demo.yaml`` followed by ``extra``."""
    listed = OmegaConf.to_container(OmegaConf.load(path or CONFIG_DIR / "demo.yaml"))["overrides"]
    return [str(item) for item in listed] + list(extra or [])


def build_synthetic_shards(overrides: list[str], console: Console) -> None:
    """Write the synthetic train/validation shards the config points at, if they are missing (the workers
    would otherwise write them on rank 0 first; here the user sees it happen)."""
    from defocus_scale.data.make_shards import make_shards
    from defocus_scale.train.config import load_train_config

    cfg = load_train_config(overrides)
    spec = cfg.synthetic_data
    if spec is None:
        return
    targets = [(cfg.data.source, spec.train_samples, 0), (cfg.data.eval_source, spec.eval_samples, 1)]
    for folder, samples, seed in targets:
        if folder and not (Path(folder) / "manifest.parquet").exists():
            console.print(f"writing {samples} synthetic images as shards to {folder}")
            make_shards(
                "synthetic", folder, synthetic_samples=samples, synthetic_classes=cfg.data.num_classes,
                synthetic_image_size=cfg.data.image_size, samples_per_shard=spec.samples_per_shard,
                seed=seed, progress=False,
            )  # fmt: skip


def summarize(run_dir: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The demo's headline numbers from the trainer's summary and the run's metrics tables."""
    from defocus_scale.train.report import plot_loss_curve, read_metrics

    rows = read_metrics(run_dir)
    # Median over steps after the first few (start-up, first checkpoint and evaluation excluded by median).
    speeds = [row["images_per_s"] for row in rows[3:]] or [row["images_per_s"] for row in rows]
    png = plot_loss_curve(run_dir, Path(run_dir) / "loss_curve.png")
    return {
        "final_step": summary.get("final_step"),
        "train_loss_first": summary.get("loss_first"),
        "train_loss_last": summary.get("loss_last"),
        "eval_top1": summary.get("eval/top1"),
        "eval_ema_top1": summary.get("eval_ema/top1"),
        "eval_loss": summary.get("eval/loss"),
        "images_per_s": statistics.median(speeds) if speeds else None,
        "world_size": summary.get("world_size"),
        "checkpoints": f"{run_dir}/checkpoints",
        "metrics": f"{run_dir}/metrics",
        "tensorboard": f"{run_dir}/tensorboard",
        "loss_curve": str(png),
    }


def run_demo(extra_overrides: list[str] | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the demo job; returns :func:`summarize`'s dict plus the launch's restarts."""
    from defocus_scale.orchestration.cli import prepare_launch
    from defocus_scale.orchestration.launch import launch

    console = console or Console()
    overrides = demo_overrides(extra_overrides)
    build_synthetic_shards(overrides, console)
    prepared = prepare_launch(overrides)
    launcher = prepared.orchestration.launcher
    console.print(f"training with {launcher.num_workers} {launcher.kind} workers; run directory "
                  f"{prepared.orchestration.run_dir}")  # fmt: skip
    result = launch(prepared.orchestration, prepared.trainer_cfg)
    headline = summarize(result.run_dir, result.summary)
    headline["launcher"] = result.launcher
    headline["wall_s"] = result.wall_s
    headline["restarts"] = len(result.restarts)
    return headline


def print_summary(headline: dict[str, Any], console: Console) -> None:
    table = Table(title="De-focus demo", show_header=False)
    table.add_column("what")
    table.add_column("value")

    def number(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [
        ("steps", str(headline["final_step"])),
        ("train loss, first -> last", f"{number(headline['train_loss_first'], '.3f')} -> "
                                      f"{number(headline['train_loss_last'], '.3f')}"),
        ("eval top-1 (live / EMA)", f"{number(headline['eval_top1'], '.1%')} / "
                                    f"{number(headline['eval_ema_top1'], '.1%')}"),
        ("images/s (all workers, median step)", number(headline["images_per_s"], ".1f")),
        ("workers, launcher", f"{headline['world_size']}, {headline['launcher']}"),
        ("wall time, restarts", f"{headline['wall_s']:.0f} s, {headline['restarts']}"),
        ("checkpoints", headline["checkpoints"]),
        ("metrics (Parquet)", headline["metrics"]),
        ("loss curve", headline["loss_curve"]),
    ]  # fmt: skip
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="the main job: train a small De-focus model with 2 Ray workers on built-in data",
        description=__doc__,
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="e.g. trainer.max_steps=40")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from defocus_scale.train.config import ConfigError

    console = Console()
    try:
        headline = run_demo(args.overrides, console)
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]config error:[/] {exc}")
        return 2
    except RuntimeError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    print_summary(headline, console)
    return 0
