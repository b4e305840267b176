"""Does the additive decay (logit bias, FlexAttention/SDPA-friendly) train as well as the paper's
multiplicative decay? Trains the same small De-focus ViT twice, same seed and data order, on the real
CIFAR-10 subset (``../shared/data``), and reports test accuracy, loss and step time side by side.

    python benchmarks/compare_vit_decay_modes.py [--epochs 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import write_result  # noqa: E402

from defocus_scale.losses import defocus_loss  # noqa: E402
from defocus_scale.models import create_model  # noqa: E402
from defocus_scale.schedules import CosineSchedule  # noqa: E402

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(p.name for p in (CIFAR / split).iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((CIFAR / split / name).glob("*.png")):
            images.append(np.asarray(Image.open(file).convert("RGB")))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD, torch.tensor(labels)


def train_one(decay_mode: str, data, epochs: int, batch: int, seed: int) -> dict:
    (train_x, train_y), (test_x, test_y) = data
    torch.manual_seed(seed)
    model = create_model(
        "defocus_vit_tiny", img_size=32, patch_size=4, num_classes=10, embed_dim=96, depth=4,
        num_heads=4, decay_mode=decay_mode, aux_head="tokens",
    )  # fmt: skip
    steps = epochs * (len(train_x) // batch)
    exempt = model.no_weight_decay_names()
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in exempt], "weight_decay": 0.05},
        {"params": [p for n, p in model.named_parameters() if n in exempt], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    lr_at = CosineSchedule(peak=1e-3, warmup_steps=steps // 10, total_steps=steps, final=1e-5)
    order = torch.Generator().manual_seed(seed)
    step, step_time = 0, 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(train_x), generator=order)
        for i in range(0, len(perm) - batch + 1, batch):
            idx = perm[i : i + batch]
            x = train_x[idx]
            flip = torch.rand(len(idx), generator=order) < 0.5  # cheap augmentation: horizontal flip
            x[flip] = x[flip].flip(-1)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            start = time.perf_counter()
            model.train()
            loss = defocus_loss(model.forward_train(x, drop_path_rate=0.1), train_y[idx], 0.1).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_time += time.perf_counter() - start
            step += 1
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(test_x[i : i + 256]) for i in range(0, len(test_x), 256)])
    return {
        "decay_mode": decay_mode, "steps": step, "ms_per_step": step_time / step * 1e3,
        "test_loss": F.cross_entropy(logits, test_y).item(),
        "test_top1": (logits.argmax(-1) == test_y).float().mean().item(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not CIFAR.is_dir():
        print(f"the CIFAR-10 subset is not at {CIFAR}; nothing to compare")
        return 1
    torch.set_num_threads(2)
    data = (load_split("train"), load_split("test"))
    rows = [train_one(mode, data, args.epochs, args.batch, seed)
            for seed in args.seeds for mode in ("multiplicative", "additive")]  # fmt: skip
    for row, seed in zip(rows, [s for s in args.seeds for _ in range(2)], strict=True):
        row["seed"] = seed
    table = Table(title=f"De-focus ViT (96 wide, 4 deep, 65 tokens), CIFAR-10 subset, {args.epochs} epochs")
    for column in ("seed", "decay_mode", "steps", "ms/step", "test loss", "test top-1"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["seed"]), row["decay_mode"], str(row["steps"]), f"{row['ms_per_step']:.1f}",
                      f"{row['test_loss']:.3f}", f"{row['test_top1']:.3f}")  # fmt: skip
    Console(width=120).print(table)
    print(f"wrote {write_result('compare_vit_decay_modes', {'epochs': args.epochs, 'rows': rows}, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
