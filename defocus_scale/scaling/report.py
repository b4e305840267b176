"""Fit a sweep's trial table and draw its plots: loss vs compute per size with the compute-optimal
frontier, fitted vs observed loss, and the compute-optimal model size and data amount."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from defocus_scale.scaling.fit import (  # noqa: E402
    CostModel,
    ScalingLawFit,
    compute_optimal_allocation,
    cost_model_from_records,
    fit_records,
    usable_records,
)
from defocus_scale.scaling.records import TrialRecord, read_records  # noqa: E402


def _by_size(records: Sequence[TrialRecord]) -> dict[int, list[TrialRecord]]:
    groups: dict[int, list[TrialRecord]] = defaultdict(list)
    for r in records:
        groups[r.params].append(r)
    return {n: sorted(rs, key=lambda r: r.compute) for n, rs in sorted(groups.items())}


def plot_loss_vs_compute(
    records: Sequence[TrialRecord], fit: ScalingLawFit, cost: CostModel, path: Path,
    loss_column: str = "val_loss", data_column: str = "tokens_seen",
) -> None:  # fmt: skip
    """Observed loss against training compute, one line per model size, with the fitted loss of each
    size along its compute axis (dotted) and the fitted compute-optimal frontier (black)."""
    fig, ax = plt.subplots(figsize=(7, 5))
    groups = _by_size(records)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    computes = np.array([r.compute for r in records])
    grid = np.geomspace(computes.min() / 2, computes.max() * 2, 100)
    for colour, (n, rs) in zip(colours, groups.items()):
        ax.plot([r.compute for r in rs], [getattr(r, loss_column) for r in rs], "o-", color=colour,
                label=f"N={n / 1e6:.3g}M (w{rs[0].width} d{rs[0].depth})")  # fmt: skip
        # The fit along this size's compute axis, a little beyond the measured range only.
        span = np.geomspace(rs[0].compute / 1.5, rs[-1].compute * 1.5, 30)
        ax.plot(span, fit.predict(n, span / cost(np.array(n))), ":", color=colour, alpha=0.8)
    n_opt, d_opt = compute_optimal_allocation(fit, grid, cost)
    ax.plot(grid, fit.predict(n_opt, d_opt), "k-", lw=2, label="fitted compute-optimal frontier")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel(loss_column.replace("_", " "))
    law = f"L = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f}"
    ax.set_title(f"{law}  (D: {data_column})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fitted_vs_observed(
    records: Sequence[TrialRecord], fit: ScalingLawFit, path: Path,
    loss_column: str = "val_loss", data_column: str = "tokens_seen",
) -> None:  # fmt: skip
    observed = np.array([getattr(r, loss_column) for r in records])
    fitted = fit.predict([r.params for r in records], [getattr(r, data_column) for r in records])
    rms = float(np.sqrt(np.mean((np.log(fitted) - np.log(observed)) ** 2)))
    fig, ax = plt.subplots(figsize=(5, 5))
    points = ax.scatter(observed, fitted, c=np.log10([r.params for r in records]), cmap="viridis")
    fig.colorbar(points, ax=ax, label="log10 N (non-embedding)")
    bounds = [min(observed.min(), fitted.min()) * 0.98, max(observed.max(), fitted.max()) * 1.02]
    ax.plot(bounds, bounds, "k--", lw=1)
    ax.set_xlabel(f"observed {loss_column}")
    ax.set_ylabel("fitted")
    ax.set_title(f"{len(records)} trials, RMS log error {rms:.3g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compute_optimal(
    fit: ScalingLawFit, cost: CostModel, computes: np.ndarray, path: Path, data_column: str = "tokens_seen"
) -> None:
    n_opt, d_opt = compute_optimal_allocation(fit, computes, cost)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(computes, n_opt, label="N_opt (non-embedding params)")
    ax.loglog(computes, d_opt, label=f"D_opt ({data_column})")
    ax.set_xlabel("training compute (FLOPs)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_sweep(
    table: str | Path,
    out_dir: str | Path,
    *,
    loss_column: str = "val_loss",
    data_column: str = "tokens_seen",
    trial_ids: Collection[str] | None = None,
    **fit_options,
) -> ScalingLawFit:
    """Fit the finished trials of the table at ``table`` (only those in ``trial_ids`` when given) and
    write ``fit.json`` (constants, intervals, compute-optimal allocation at the sweep's budgets) and
    ``loss_vs_compute.png``, ``fitted_vs_observed.png``, ``compute_optimal.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = read_records(table)
    if trial_ids is not None:
        records = [r for r in records if r.trial_id in trial_ids]
    records = usable_records(records, loss_column)
    if not records:
        raise ValueError(f"trial table {table} has no finished trials with a finite {loss_column}")
    fit = fit_records(records, loss_column=loss_column, data_column=data_column, **fit_options)
    cost = cost_model_from_records(records, data_column)
    budgets = np.unique([r.compute for r in records])
    computes = np.geomspace(budgets.min(), budgets.max() * 100, 20)
    n_opt, d_opt = compute_optimal_allocation(fit, computes, cost)
    summary = {
        "fit": fit.to_dict(),
        "loss_column": loss_column,
        "data_column": data_column,
        "trials": len(records),
        "compute_optimal": [
            {"compute": float(c), "params": float(n), data_column: float(d), "loss": float(fit.predict(n, d))}
            for c, n, d in zip(computes, n_opt, d_opt)
        ],
    }
    (out / "fit.json").write_text(json.dumps(summary, indent=2))
    plot_loss_vs_compute(records, fit, cost, out / "loss_vs_compute.png", loss_column, data_column)
    plot_fitted_vs_observed(records, fit, out / "fitted_vs_observed.png", loss_column, data_column)
    plot_compute_optimal(fit, cost, computes, out / "compute_optimal.png", data_column)
    return fit
