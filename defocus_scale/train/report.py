"""Read a run's metrics tables back and draw its loss curve (for summaries, the demo and notebooks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq


def read_metrics(run_dir: str, table: str = "train") -> list[dict[str, Any]]:
    """Rows of ``<run_dir>/metrics/<table>/`` ordered by step. Each process start writes its own part, so
    steps redone after a restart appear in two parts: the later part (the replay) wins."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    folder = f"{root.rstrip('/')}/metrics/{table}"
    if not fs.exists(folder):
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for part in sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet")):
        with fs.open(part, "rb") as handle:
            for row in pq.read_table(handle).to_pylist():
                by_step[int(row["step"])] = row
    return [by_step[step] for step in sorted(by_step)]


def plot_loss_curve(run_dir: str, out: str | Path) -> Path:
    """Training loss (total, main, aux) per step, with the validation loss where evaluated, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows, eval_rows = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    if not train_rows:
        raise FileNotFoundError(f"no training metrics under {run_dir}/metrics/train")
    steps = [row["step"] for row in train_rows]
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    axis.plot(steps, [row["loss"] for row in train_rows], label="train loss (main + aux) / 2", lw=1.6)
    for key, label in (("loss_main", "train main (class token)"), ("loss_aux", "train aux (patch tokens)")):
        values = [row.get(key) for row in train_rows]
        if any(v is not None and v == v for v in values):  # NaN when the model has no aux head
            axis.plot(steps, values, label=label, lw=0.9, alpha=0.7)
    evaluated = [row for row in eval_rows if row.get("eval/loss") is not None]
    if evaluated:
        eval_steps, eval_losses = [r["step"] for r in evaluated], [r["eval/loss"] for r in evaluated]
        axis.plot(eval_steps, eval_losses, "o-", label="validation (live weights)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy")
    axis.set_title(f"Loss curve: {Path(run_dir).name}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out
