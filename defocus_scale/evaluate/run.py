"""Scoring a model on a validation source on 1..N ranks: in this process (a world of one, or the process
group ``torchrun`` set up), or launched through the orchestration's launchers (torchrun, Ray) with
:func:`evaluate_in_process_group` as the workers' entry.

The model is built sharded exactly as the trainer builds it (``train.parallel.build_sharded_model``), the
batches come from the trainer's evaluation loader (``data.loader.build_eval_loader``: the model's eval
transform, every sample once across ranks), and the loop is the trainer's evaluation (``train.loop.evaluate``:
lockstep ranks, padded batches) with per-class counts and an optional class map added."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from defocus_scale.data.config import DataConfig
from defocus_scale.evaluate.sources import (
    check_classes,
    default_data,
    load_weights,
    prepare_data,
    read_class_map,
    resolve_model,
)
from defocus_scale.train.parallel import DistEnv, build_sharded_model, init_distributed

logger = logging.getLogger(__name__)

ENTRY = "defocus_scale.evaluate.run:evaluate_in_process_group"


@dataclass
class EvalRequest:
    """What to score on what (plain values: it travels to the launcher's workers)."""

    model: str  # run directory / DCP checkpoint folder, exported .safetensors, released .pth
    data: str  # shard directory / manifest / pattern / URL, ImageFolder tree, Parquet file(s)
    ema: bool = False
    out: str | None = None  # JSON file (rank 0)
    batch_size: int = 64  # per rank
    workers: int = 2  # data loader processes per rank
    device: str = "auto"
    precision: str = "auto"
    class_map: str | None = None  # the release's map22kto1k.txt for a 21k-class model on ImageNet-1k
    max_batches: int | None = None  # per rank
    cache_dir: str | None = None  # where an ImageFolder / Parquet source is converted to shards
    image_size: int | None = None  # override the model's evaluation resolution
    crop_pct: float | None = None  # override its center-crop fraction
    backend: str | None = None  # operator backend override (auto, torch, triton)
    release: dict[str, Any] = field(default_factory=dict)  # group_size, rope_scale, ... of a released file


@torch.no_grad()
def score(
    model: nn.Module,
    loader: Any,
    env: DistEnv,
    *,
    image_size: int,
    num_classes: int,
    class_map: list[int] | None = None,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Top-1/top-5, mean CE and per-class top-1 of the last token's logits over the loader, summed across
    ranks; ranks that run out of batches first keep joining the collectives on a padded dummy batch (as the
    trainer's ``evaluate``, whose numbers this reproduces)."""
    was_training = model.training
    model.eval()
    index = torch.tensor(class_map, device=env.device) if class_map is not None else None
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # correct@1, correct@5, loss sum
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=env.device)  # images, correct@1
    batches, seen, full = iter(loader), 0, None
    while True:
        batch = next(batches, None) if max_batches is None or seen < max_batches else None
        seen += 1
        have = torch.tensor([int(batch is not None)], device=env.device)
        dist.all_reduce(have, op=dist.ReduceOp.MAX)
        if not have.item():
            break
        images = batch[0] if batch is not None else torch.zeros(0, 3, image_size, image_size)
        full = full or max(images.shape[0], 1)
        count = images.shape[0]
        if count < full:
            images = torch.cat([images, images.new_zeros(full - count, *images.shape[1:])])
        logits = model(images.to(env.device, non_blocking=True)).float()[:count]
        if batch is None:
            continue
        if index is not None:
            logits = logits.index_select(1, index)
        labels = batch[1].to(env.device)
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = (top5[:, 0] == labels).double()
        totals[0] += hit.sum()
        totals[1] += (top5 == labels[:, None]).any(dim=-1).sum()
        totals[2] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        per_class[0].index_add_(0, labels, torch.ones_like(hit))
        per_class[1].index_add_(0, labels, hit)
    dist.all_reduce(totals)
    dist.all_reduce(per_class)
    model.train(was_training)
    images_seen = per_class[0].sum().item()
    count = max(images_seen, 1.0)
    return {
        "top1": totals[0].item() / count,
        "top5": totals[1].item() / count,
        "loss": totals[2].item() / count,
        "images": int(images_seen),
        "per_class_images": per_class[0].tolist(),
        "per_class_correct": per_class[1].tolist(),
    }


def run_eval(request: EvalRequest, env: DistEnv | None = None) -> dict[str, Any]:
    """Score ``request.model`` on ``request.data`` in this process group (created as a world of one when
    there is none); every rank returns the result, rank 0 writes ``request.out``."""
    env = env or init_distributed(request.device)
    source = resolve_model(request.model, ema=request.ema, release=request.release)
    shards, class_names = prepare_data(request.data, request.cache_dir, is_main=env.is_main)
    data = default_data(source, {"image_size": request.image_size, "eval_crop_pct": request.crop_pct})
    class_map = read_class_map(request.class_map)
    model_classes = int(source.overrides.get("num_classes", data["num_classes"]))
    data_classes = len(class_names) if class_names else len(class_map) if class_map else model_classes
    check_classes(model_classes, data_classes, class_map)
    overrides = {**source.overrides, **({"backend": request.backend} if request.backend else {})}
    model = build_sharded_model(source.name, overrides, env, precision=request.precision)
    load_weights(model, source)
    cfg = DataConfig(
        source=shards,
        eval_source=shards,
        num_classes=data_classes,
        image_size=int(data["image_size"]),
        batch_size=request.batch_size,
        workers=request.workers,
        interpolation=data["interpolation"],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        eval_crop_pct=float(data["eval_crop_pct"]),
        mixup=0.0,
        cutmix=0.0,
        label_smoothing=0.0,
    )
    from defocus_scale.data.loader import build_eval_loader

    loader = build_eval_loader(cfg, rank=env.rank, world_size=env.world_size, device=env.device)
    scores = score(
        model,
        loader,
        env,
        image_size=cfg.image_size,
        num_classes=data_classes,
        class_map=class_map,
        max_batches=request.max_batches,
    )
    images, correct = scores.pop("per_class_images"), scores.pop("per_class_correct")
    names = class_names or [str(i) for i in range(data_classes)]
    per_class = [
        {"class": i, "name": names[i], "images": int(n), "top1": c / n}
        for i, (n, c) in enumerate(zip(images, correct))
        if n
    ]
    result = {
        "model": source.path,
        "kind": source.kind,
        "weights": source.weights,
        "model_name": source.name,
        "data": request.data,
        "shards": shards,
        "world_size": env.world_size,
        **scores,
        "transform": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items() if k != "num_classes"
        },
        "class_map": request.class_map,
        "per_class": per_class,
    }
    if env.is_main and request.out:
        Path(request.out).parent.mkdir(parents=True, exist_ok=True)
        Path(request.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def evaluate_in_process_group(cfg: dict[str, Any], hooks: Any = None) -> dict[str, Any]:
    """The launchers' worker entry (``orchestration.launch(..., entry=ENTRY)``): ``cfg`` holds an
    :class:`EvalRequest`'s fields (the launcher's own additions are ignored)."""
    known = {f.name for f in dataclasses.fields(EvalRequest)}
    return run_eval(EvalRequest(**{k: v for k, v in cfg.items() if k in known}))


def launch_eval(request: EvalRequest, launcher: str, num_workers: int) -> dict[str, Any]:
    """Run :func:`evaluate_in_process_group` on ``num_workers`` processes through the orchestration's
    ``launcher`` (``torchrun`` or ``ray``); returns rank 0's result."""
    from defocus_scale.orchestration.config import LauncherConfig, OrchestrationConfig
    from defocus_scale.orchestration.launch import launch

    gpus = 1.0 if request.device != "cpu" and torch.cuda.is_available() else 0.0
    with tempfile.TemporaryDirectory(prefix="defocus-eval-") as folder:
        orchestration = OrchestrationConfig(
            launcher=LauncherConfig(
                kind=launcher, num_workers=num_workers, max_failures=0, gpus_per_worker=gpus
            ),
            storage_path=folder,
            run_name="eval",
        )
        return launch(orchestration, dataclasses.asdict(request), ENTRY).summary
