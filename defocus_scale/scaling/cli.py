"""``defocus-scale sweep CONFIG [key=value ...]``: run a scaling-law sweep (``configs/sweep/CONFIG.yaml``)
as training jobs of the real trainer, record every trial in ``OUT/trials.parquet``, fit
``L(N, D) = E + A/N^alpha + B/D^beta`` to the finished trials and write the fit (``fit.json``) and plots.

Rerunning the same command resumes: finished trials are skipped. ``--report-only`` fits and plots the
table as it is.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from defocus_scale.scaling.fit import CONSTANTS, ScalingLawFit
from defocus_scale.scaling.records import TrialRecord, read_records
from defocus_scale.scaling.report import report_sweep
from defocus_scale.scaling.runner import SweepConfigError, SweepLayout, error_cause, run_sweep
from defocus_scale.scaling.sweep_plan import load_sweep_config, plan_trials

DEFAULT_ROOT = Path("runs") / "sweeps"


def _number(value: float, digits: int = 3) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}g}"


def records_table(records: Sequence[TrialRecord], title: str) -> Table:
    table = Table(title=title)
    for column in ("size", "N", "FLOPs/img", "images", "compute", "lr", "train loss", "val loss",
                   "val acc", "wall s", "status"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("size", "status") else "right")
    for r in sorted(records, key=lambda r: (r.params, r.compute)):
        status = r.status if r.status == "finished" else f"[red]{r.status}"
        table.add_row(
            f"w{r.width}d{r.depth}", _number(r.params), _number(r.flops_per_image), f"{r.images_seen}",
            _number(r.compute), _number(r.lr), _number(r.train_loss), _number(r.val_loss),
            _number(r.val_acc), f"{r.wall_time_s:.0f}", status,
        )  # fmt: skip
    return table


def fit_lines(fit: ScalingLawFit) -> list[str]:
    lines = [f"L(N, D) = E + A/N^alpha + B/D^beta over {fit.n_points} trials "
             f"({fit.bootstrap_samples} bootstrap resamples, {fit.confidence:.0%} intervals):"]  # fmt: skip
    for name in CONSTANTS:
        low, high = fit.intervals.get(name, (math.nan, math.nan))
        lines.append(f"  {name:>5} = {getattr(fit, name):.4g}  [{low:.4g}, {high:.4g}]")
    return lines


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep", help="run a scaling-law sweep (training jobs through Ray), fit L(N, D) and plot it",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("config", metavar="CONFIG_NAME", help="configs/sweep/<name>.yaml, or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the sweep config")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"table, fit and plots (default: {DEFAULT_ROOT}/<sweep name>)")  # fmt: skip
    parser.add_argument("--runs", type=Path, default=None,
                        help="trial run directories and shared data (default: OUT/runs)")  # fmt: skip
    parser.add_argument("--concurrent", type=int, default=None,
                        help="trials at once (default: as many as the CPUs hold)")  # fmt: skip
    parser.add_argument("--launcher", choices=("ray", "torchrun"), default="ray")
    parser.add_argument("--report-only", action="store_true", help="fit and plot the table; run nothing")
    parser.add_argument("--loss", choices=("val_loss", "train_loss"), default="val_loss",
                        help="the loss the law is fitted to")  # fmt: skip
    parser.add_argument("--data-unit", choices=("tokens_seen", "images_seen"), default="tokens_seen",
                        help="what D counts")  # fmt: skip
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    console = Console(width=None if sys.stdout.isatty() else 140)  # logs keep the table's columns
    if args.concurrent is not None and args.concurrent < 1:
        console.print(f"[red]--concurrent must be at least 1, got {args.concurrent}[/]")
        return 2
    try:
        cfg = load_sweep_config(args.config, args.overrides)
        trials = plan_trials(cfg)
    except (FileNotFoundError, ValueError, KeyError, OmegaConfBaseException) as exc:
        console.print(f"[red]sweep config error:[/] {exc}")  # omegaconf's errors name the key
        return 2
    layout = SweepLayout.at(args.out or DEFAULT_ROOT / cfg.name, args.runs)
    console.print(f"sweep [bold]{cfg.name}[/]: {len(trials)} trials; table {layout.table}")
    if not args.report_only:

        def show(record: TrialRecord) -> None:
            note = (
                f"val loss {record.val_loss:.4f}"
                if record.status == "finished"
                else error_cause(record.error)
            )
            console.print(f"  {record.status}: {record.trial_id} ({record.wall_time_s:.0f} s) {note}")

        try:
            outcome = run_sweep(
                cfg, layout, concurrent=args.concurrent, launcher=args.launcher, on_record=show
            )
        except SweepConfigError as exc:
            console.print(f"[red]sweep config error:[/] {exc}")
            return 2
        console.print(f"ran {len(outcome.records)} trials; {len(outcome.skipped)} were already finished")
    planned = {t.trial_id for t in trials}
    records = [r for r in read_records(layout.table) if r.trial_id in planned]
    others = len(read_records(layout.table)) - len(records)
    console.print(
        records_table(records, f"sweep {cfg.name}: {len(records)} of {len(trials)} trials recorded")
    )
    if others:
        console.print(f"({others} records of trials outside this plan are left out of the table and fit)")
    for r in records:
        if r.error:
            console.print(f"[red]{r.status}[/] {r.trial_id}: {error_cause(r.error)}")
    try:
        fit = report_sweep(
            layout.table, layout.out_dir, loss_column=args.loss, data_column=args.data_unit,
            trial_ids=planned, bootstrap=args.bootstrap,
        )  # fmt: skip
    except ValueError as exc:
        console.print(f"[red]no fit:[/] {exc}")
        return 1
    console.print("\n".join(fit_lines(fit)))
    console.print(f"fit and plots in {layout.out_dir}")
    failed = [r for r in records if r.status != "finished"]
    return 1 if failed else 0
