"""The plain in-process trainer entry (``torchrun -m defocus_scale.train KEY=VALUE...``) and ``defocus-scale
export CKPT OUT.safetensors [--ema]``. ``defocus-scale train`` launches through the orchestration
(``defocus_scale.orchestration.cli``), whose workers run the same trainer."""

from __future__ import annotations

import argparse
import json
import logging

import torch.distributed as dist
from rich.console import Console

from defocus_scale.train.config import ConfigError, load_train_config


def run_from_overrides(overrides: list[str]) -> int:
    """Compose ``configs/train.yaml`` with ``overrides`` and train in this process's group (torchrun's, or a
    world of one)."""
    from defocus_scale.train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True)
    try:
        cfg = load_train_config(overrides)
    except ConfigError as exc:
        console.print(f"[red]config error:[/] {exc}")
        return 2
    try:
        summary = train(cfg, console=console)
        if dist.get_rank() == 0:
            print(json.dumps(summary, indent=2, default=str))
        dist.barrier()  # gloo aborts a process whose peer tears the group down while it is still in use
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    export_parser = subparsers.add_parser(
        "export", help="write a checkpoint's weights as one safetensors file for inference",
        description="CKPT is a checkpoint folder (RUN/checkpoints/step_N) or a run directory (its newest "
        "complete checkpoint). Load the result with defocus_scale.train.load_exported.",
    )  # fmt: skip
    export_parser.add_argument("checkpoint", metavar="CKPT")
    export_parser.add_argument("out", metavar="OUT.safetensors")
    export_parser.add_argument(
        "--ema", action="store_true", help="export the EMA weights instead of the live ones"
    )
    export_parser.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from defocus_scale.train.checkpoint import CheckpointError
    from defocus_scale.train.export import export_checkpoint

    try:
        metadata = export_checkpoint(args.checkpoint, args.out, ema=args.ema)
    except (CheckpointError, FileNotFoundError) as exc:
        Console(stderr=True).print(f"[red]export failed:[/] {exc}")
        return 1
    print(f"wrote {args.out}: {metadata['model']} ({metadata['weights']} weights, step {metadata['step']})")
    return 0
