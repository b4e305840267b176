"""``defocus-scale eval MODEL DATA`` and ``defocus-scale convert RELEASED OUT``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

_EXPECTED_ERRORS = (
    ValueError,
    FileNotFoundError,
    RuntimeError,
)  # CheckpointError is a ValueError/RuntimeError


def _release_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "released checkpoints",
        "settings the tensors do not hold; a file saved by the release's training "
        "script carries them in its config (contradicting it is an error)",
    )
    group.add_argument("--group-norm-size", type=int, dest="group_size", help="default 64")
    group.add_argument("--rope-scale", type=float, help="default 1.0 (the Large 384-px fine-tune: 4.0)")
    group.add_argument("--delta-scale", type=float, help="default 1.0 (the Large 384-px fine-tune: 2.0)")
    group.add_argument(
        "--img-size", type=int, help="the model's image size (default 224; Large fine-tune 384)"
    )
    group.add_argument(
        "--token-order",
        choices=("raster", "quadrant"),
        help="patch order (quadrant: the release's patch_embed_change_res); default raster",
    )


def _release_settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("group_size", "rope_scale", "delta_scale", "img_size", "token_order")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a run, an exported file or a released checkpoint on a validation set",
        description="MODEL: a run directory (its newest complete checkpoint) or a checkpoint folder "
        "RUN/checkpoints/step_N, an exported .safetensors file, or a released De-focus Mamba .pth. "
        "DATA: a shard directory / manifest / pattern / URL, an ImageFolder tree, or Parquet files "
        "(the last two are converted "
        "to shards once, into --cache-dir). The model's own eval transform (its run's, its export's or its "
        "timm pretrained config) unless overridden. Runs in this process (or in torchrun's process "
        "group), or "
        "on --num-workers processes through --launcher.",
    )
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("data", metavar="DATA")
    parser.add_argument("--ema", action="store_true", help="the EMA weights (a run's, a released model_ema)")
    parser.add_argument("--out", help="write the result (per-class accuracy included) as JSON here")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes per rank (default 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument(
        "--class-map",
        help="one model-class index per line per evaluation class, e.g. the "
        "release's map22kto1k.txt for a 21k-class model on ImageNet-1k",
    )
    parser.add_argument("--max-batches", type=int, help="per rank")
    parser.add_argument(
        "--cache-dir", help="where ImageFolder / Parquet sources become shards (shared by ranks)"
    )
    parser.add_argument("--image-size", type=int, help="evaluation resolution (default: the model's)")
    parser.add_argument("--crop-pct", type=float, help="center-crop fraction (default: the model's)")
    parser.add_argument("--backend", help="operator backend (auto, torch, triton)")
    parser.add_argument(
        "--launcher",
        choices=("none", "torchrun", "ray"),
        default="none",
        help="none: this process (or torchrun's group); torchrun / ray: start --num-workers",
    )
    parser.add_argument("--num-workers", type=int, default=1, help="ranks with --launcher (default 1)")
    _release_options(parser)
    parser.set_defaults(func=_eval)

    convert = subparsers.add_parser(
        "convert",
        help="write a released De-focus Mamba checkpoint as an exported safetensors file",
        description="RELEASED: a .pth of the OpenGVLab release (a state dict, or the training script's "
        "checkpoint "
        "with model / model_ema / config), read without unpickling code. The result loads with "
        "defocus_scale.train.load_exported, trainer.init_from and defocus-scale eval.",
    )
    convert.add_argument("released", metavar="RELEASED")
    convert.add_argument("out", metavar="OUT.safetensors")
    convert.add_argument("--ema", action="store_true", help="convert model_ema instead of model")
    _release_options(convert)
    convert.set_defaults(func=_convert)


def _request(args: argparse.Namespace) -> Any:
    from defocus_scale.evaluate.run import EvalRequest

    return EvalRequest(
        model=args.model,
        data=args.data,
        ema=args.ema,
        out=args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        class_map=args.class_map,
        max_batches=args.max_batches,
        cache_dir=args.cache_dir,
        image_size=args.image_size,
        crop_pct=args.crop_pct,
        backend=args.backend,
        release=_release_settings(args),
    )


def print_result(result: dict[str, Any], console: Console, *, rows: int = 20) -> None:
    console.print(
        f"[bold]{result['model_name']}[/] ({result['kind']}, {result['weights']} weights) on "
        f"{result['images']} images of {result['data']}, {result['world_size']} rank(s): "
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
        f"loss {result['loss']:.4f}"
    )
    per_class = sorted(result["per_class"], key=lambda c: (c["top1"], c["class"]))
    shown = per_class if len(per_class) <= rows else per_class[: rows // 2] + per_class[-rows // 2 :]
    title = (
        "per-class top-1"
        if len(shown) == len(per_class)
        else f"per-class top-1: the {rows // 2} lowest and highest of {len(per_class)}"
    )
    table = Table(title=title)
    for column in ("class", "name", "images", "top-1 %"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for row in shown:
        table.add_row(str(row["class"]), row["name"], str(row["images"]), f"{100 * row['top1']:.1f}")
    console.print(table)


def _eval(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from defocus_scale.evaluate.run import launch_eval, run_eval

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    request, err = _request(args), Console(stderr=True)
    try:
        if args.launcher != "none":
            result = launch_eval(request, args.launcher, args.num_workers)
        else:
            owns_group = not dist.is_initialized()
            try:
                result = run_eval(request)
                is_main = dist.get_rank() == 0
            finally:
                if owns_group and dist.is_initialized():
                    dist.destroy_process_group()
            if not is_main:
                return 0
    except _EXPECTED_ERRORS as exc:
        err.print(f"[red]eval failed:[/] {exc}")
        return 1
    print_result(result, Console())
    if args.out:
        Console().print(f"wrote {args.out}")
    print(json.dumps({k: result[k] for k in ("top1", "top5", "loss", "images")}))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from defocus_scale.train.export import convert_release

    try:
        metadata = convert_release(args.released, args.out, ema=args.ema, **_release_settings(args))
    except _EXPECTED_ERRORS as exc:
        Console(stderr=True).print(f"[red]convert failed:[/] {exc}")
        return 1
    print(f"wrote {args.out}: {metadata['model']} ({metadata['weights']} weights of {args.released})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m defocus_scale.evaluate`` (e.g. under torchrun): the eval command alone."""
    parser = argparse.ArgumentParser(prog="defocus_scale.evaluate")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)
