"""``defocus-scale demo``: build a small De-focus model and train it for a few CPU steps on the built-in
synthetic data, then report loss and accuracy before and after. The config is ``configs/demo.yaml``;
``key=value`` arguments override it."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from defocus_scale.data.synthetic import synthetic_batch
from defocus_scale.losses import defocus_loss
from defocus_scale.models import create_model
from defocus_scale.schedules import CosineSchedule, DropPathSchedule
from defocus_scale.train.optim import param_groups

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DropPathConfig:
    start: float = MISSING
    end: float = MISSING
    kind: str = MISSING


@dataclass
class DemoConfig:
    """Typed schema of ``configs/demo.yaml`` (the values live in the YAML)."""

    model: str = MISSING
    model_overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int = MISSING
    patch_size: int = MISSING
    num_classes: int = MISSING
    batch_size: int = MISSING
    steps: int = MISSING
    eval_images: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    grad_clip: float = MISSING
    label_smoothing: float = MISSING
    drop_path: DropPathConfig = field(default_factory=DropPathConfig)
    seed: int = MISSING
    threads: int = MISSING


def load_demo_config(overrides: list[str] | None = None, path: Path | None = None) -> DemoConfig:
    """``configs/demo.yaml`` merged onto the typed schema, then ``key=value`` overrides; an unknown key or
    a wrongly typed value is an error naming the key."""
    schema = OmegaConf.structured(DemoConfig)
    file_cfg = OmegaConf.load(path or CONFIG_DIR / "demo.yaml")
    merged = OmegaConf.merge(schema, file_cfg, OmegaConf.from_dotlist(overrides or []))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images.float() - mean) / std


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int
) -> tuple[float, float]:
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(images), batch):
        logits = model(normalize(images[i : i + batch]))
        total_loss += torch.nn.functional.cross_entropy(logits, labels[i : i + batch], reduction="sum").item()
        correct += (logits.argmax(-1) == labels[i : i + batch]).sum().item()
    return total_loss / len(images), correct / len(images)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict[str, float]:
    console = console or Console()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = create_model(
        cfg.model, img_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes,
        **cfg.model_overrides,
    )  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    console.print(
        f"[bold]{cfg.model}[/] ({params / 1e6:.2f}M parameters), {cfg.steps} steps of batch "
        f"{cfg.batch_size} on synthetic {cfg.image_size}px images, {cfg.num_classes} classes"
    )
    data = dict(image_size=cfg.image_size, num_classes=cfg.num_classes)
    eval_images, eval_labels = synthetic_batch(0, cfg.eval_images, seed=cfg.seed + 1, **data)
    loss_before, acc_before = evaluate(model, eval_images, eval_labels, cfg.batch_size * 4)

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    lr_at = CosineSchedule(
        peak=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, final=cfg.lr * 0.01
    )
    drop_path = DropPathSchedule(cfg.drop_path.start, cfg.drop_path.end, cfg.drop_path.kind)
    train_losses: list[float] = []
    start = time.perf_counter()
    columns = (
        TextColumn("train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=cfg.steps, status="")
        for step in range(cfg.steps):
            model.train()
            images, labels = synthetic_batch(step * cfg.batch_size, cfg.batch_size, seed=cfg.seed, **data)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            rate = drop_path.rate(step, cfg.steps)
            loss = defocus_loss(model(normalize(images), drop_path_rate=rate), labels, cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            train_losses.append(loss.total.item())
            progress.update(
                task,
                advance=1,
                status=f"loss {loss.total.item():.3f} lr {lr_at(step):.2e} "
                f"drop-path {rate:.3f} |g| {grad_norm.item():.2f}",
            )
    seconds = time.perf_counter() - start
    loss_after, acc_after = evaluate(model, eval_images, eval_labels, cfg.batch_size * 4)

    head = max(1, min(5, len(train_losses) // 4))
    summary = {
        "params": float(params),
        "train_loss_first": sum(train_losses[:head]) / head,
        "train_loss_last": sum(train_losses[-head:]) / head,
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "eval_acc_before": acc_before,
        "eval_acc_after": acc_after,
        "images_per_s": cfg.steps * cfg.batch_size / seconds,
    }
    table = Table(title="demo summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}")
    console.print(table)
    return summary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="train a small De-focus model for a few CPU steps on built-in synthetic data",
        description=__doc__,
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of configs/demo.yaml")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    summary = run_demo(load_demo_config(args.overrides))
    return 0 if summary["eval_loss_after"] < summary["eval_loss_before"] else 1
