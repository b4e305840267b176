"""Compare two scaling sweeps of the same plan run for two model families (e.g. De-focus Mamba vs plain
Mamba): validation loss and accuracy of each at every matched (size, compute budget), their difference,
and the seed spread where a point has several seeds.

    python benchmarks/compare_sweeps.py OUT_A OUT_B [--labels A B] [--out DIR]

``OUT_A``/``OUT_B`` are ``defocus-scale sweep --out`` folders (their ``trials.parquet`` is read). Trials
match by width, depth and compute: the two families count slightly different FLOPs per image (an aux
head, a norm), so a budget gives them slightly different image counts; trials of one size whose compute
lies within 10% are the same budget. A point's loss is the mean over its seeds; its spread is the range
(max - min) over them. Writes ``comparison.json`` and ``comparison.png`` under ``--out`` and prints a
table and a verdict: at how many matched points A's loss is lower, and whether the gap at each size's
largest budget exceeds the seed range of either family there.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from defocus_scale.scaling.records import TrialRecord, read_records  # noqa: E402

SAME_BUDGET = 0.1  # relative compute difference under which two trials of one size share a budget


@dataclass(frozen=True)
class Side:
    """One family's trials at one (size, budget): means and ranges over its seeds."""

    compute: float
    seeds: int
    val_loss: float
    val_loss_min: float
    val_loss_max: float
    val_acc: float
    val_acc_min: float
    val_acc_max: float

    @property
    def loss_range(self) -> float:
        return self.val_loss_max - self.val_loss_min


@dataclass(frozen=True)
class Point:
    width: int
    depth: int
    params: int
    budget_index: int  # 0 = this size's smallest budget
    largest: bool  # this size's largest budget
    a: Side
    b: Side

    @property
    def loss_diff(self) -> float:  # A minus B
        return self.a.val_loss - self.b.val_loss

    @property
    def acc_diff(self) -> float:
        return self.a.val_acc - self.b.val_acc

    @property
    def beyond_seed_range(self) -> bool | None:
        """Whether the gap exceeds both families' seed ranges (None with one seed on either side)."""
        if self.a.seeds < 2 or self.b.seeds < 2:
            return None
        return abs(self.loss_diff) > max(self.a.loss_range, self.b.loss_range)


def _side(records: Sequence[TrialRecord]) -> Side:
    losses, accs = [r.val_loss for r in records], [r.val_acc for r in records]
    return Side(
        compute=statistics.fmean(r.compute for r in records), seeds=len(records),
        val_loss=statistics.fmean(losses), val_loss_min=min(losses), val_loss_max=max(losses),
        val_acc=statistics.fmean(accs), val_acc_min=min(accs), val_acc_max=max(accs),
    )  # fmt: skip


def _budgets(records: Sequence[TrialRecord]) -> dict[tuple[int, int], list[list[TrialRecord]]]:
    """Finished trials grouped by size, then by budget (ascending compute)."""
    by_size: dict[tuple[int, int], list[TrialRecord]] = defaultdict(list)
    for r in records:
        if r.status == "finished" and math.isfinite(r.val_loss):
            by_size[(r.width, r.depth)].append(r)
    grouped: dict[tuple[int, int], list[list[TrialRecord]]] = {}
    for size, rs in by_size.items():
        groups: list[list[TrialRecord]] = []
        for r in sorted(rs, key=lambda r: r.compute):
            if groups and r.compute <= groups[-1][0].compute * (1 + SAME_BUDGET):
                groups[-1].append(r)
            else:
                groups.append([r])
        grouped[size] = groups
    return grouped


def match(a: Sequence[TrialRecord], b: Sequence[TrialRecord]) -> list[Point]:
    """The (size, budget) points both tables have, ordered by size then compute."""
    budgets_a, budgets_b = _budgets(a), _budgets(b)
    points = []
    for size in sorted(budgets_a.keys() & budgets_b.keys(), key=lambda s: (s[1], s[0])):
        groups_a, groups_b = budgets_a[size], budgets_b[size]
        largest_a = max(g[0].compute for g in groups_a)
        for index, group_a in enumerate(groups_a):
            compute = group_a[0].compute
            group_b = next((g for g in groups_b if abs(g[0].compute / compute - 1) <= SAME_BUDGET), None)
            if group_b is None:
                continue
            points.append(
                Point(width=size[0], depth=size[1], params=group_a[0].params, budget_index=index,
                      largest=compute == largest_a, a=_side(group_a), b=_side(group_b))
            )  # fmt: skip
    return points


def verdict(points: Sequence[Point], labels: tuple[str, str]) -> list[str]:
    lower = sum(p.loss_diff < 0 for p in points)
    lines = [f"{labels[0]}'s validation loss is lower than {labels[1]}'s at {lower} of {len(points)} "
             "matched (size, budget) points"]  # fmt: skip
    for p in (p for p in points if p.largest):
        seeds = f"{p.a.seeds}+{p.b.seeds} seeds"
        if p.beyond_seed_range is None:
            lines.append(f"w{p.width}d{p.depth} at its largest budget: gap {p.loss_diff:+.4f} (one seed)")
            continue
        compare = "exceeds" if p.beyond_seed_range else "does not exceed"
        lines.append(
            f"w{p.width}d{p.depth} at its largest budget ({p.a.compute:.3g} FLOPs, {seeds}): gap "
            f"{p.loss_diff:+.4f} {compare} the seed ranges ({labels[0]} {p.a.loss_range:.4f}, "
            f"{labels[1]} {p.b.loss_range:.4f})"
        )
    return lines


def _cell(value: float, low: float, high: float, seeds: int, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return escape(text + (f" [{low:.{digits}f}, {high:.{digits}f}]" if seeds > 1 else ""))


def _loss(side: Side) -> str:
    return _cell(side.val_loss, side.val_loss_min, side.val_loss_max, side.seeds, 4)


def _acc(side: Side) -> str:
    return _cell(100 * side.val_acc, 100 * side.val_acc_min, 100 * side.val_acc_max, side.seeds, 1)


def table(points: Sequence[Point], labels: tuple[str, str]) -> Table:
    t = Table(title=f"{labels[0]} vs {labels[1]}: validation loss / top-1 (mean \\[min, max] over seeds)")
    for column in ("size", "N", "compute", "seeds", f"{labels[0]} loss", f"{labels[1]} loss", "diff",
                   f"{labels[0]} acc %", f"{labels[1]} acc %", "diff pp"):  # fmt: skip
        t.add_column(column, justify="left" if column == "size" else "right")
    for p in points:
        t.add_row(
            f"w{p.width}d{p.depth}", f"{p.params:,}", f"{p.a.compute:.3g}", f"{p.a.seeds}/{p.b.seeds}",
            _loss(p.a), _loss(p.b), f"{p.loss_diff:+.4f}", _acc(p.a), _acc(p.b),
            f"{100 * p.acc_diff:+.1f}",
        )  # fmt: skip
    return t


def plot(points: Sequence[Point], labels: tuple[str, str], path: Path) -> None:
    fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(11, 4.5))
    sizes = sorted({(p.params, p.width, p.depth) for p in points})
    colours = plt.cm.viridis([i / max(1, len(sizes) - 1) * 0.9 for i in range(len(sizes))])
    for colour, (params, width, depth) in zip(colours, sizes):
        ps = [p for p in points if (p.width, p.depth) == (width, depth)]
        for side, style, label in ((lambda p: p.a, "o-", labels[0]), (lambda p: p.b, "s--", labels[1])):
            x = [side(p).compute for p in ps]
            y = [side(p).val_loss for p in ps]
            err = [[side(p).val_loss - side(p).val_loss_min for p in ps],
                   [side(p).val_loss_max - side(p).val_loss for p in ps]]  # fmt: skip
            ax_loss.errorbar(x, y, yerr=err, fmt=style, color=colour, capsize=3,
                             label=f"{label} w{width}d{depth} (N={params / 1e3:.0f}k)")  # fmt: skip
        ax_diff.plot([p.a.compute for p in ps], [p.loss_diff for p in ps], "o-", color=colour,
                     label=f"w{width}d{depth}")  # fmt: skip
        for p in ps:
            if p.largest and p.a.seeds > 1 and p.b.seeds > 1:
                half = max(p.a.loss_range, p.b.loss_range)
                ax_diff.errorbar([p.a.compute], [p.loss_diff], yerr=[[half], [half]], color=colour, capsize=4)
    for ax in (ax_loss, ax_diff):
        ax.set_xscale("log")
        ax.set_xlabel("training compute (FLOPs)")
        ax.grid(True, which="both", alpha=0.3)
    ax_loss.set_ylabel("validation loss (bars: min-max over seeds)")
    ax_loss.legend(fontsize=7)
    ax_diff.axhline(0.0, color="k", lw=1)
    ax_diff.set_ylabel(f"{labels[0]} - {labels[1]} validation loss")
    ax_diff.set_title("bars: the larger seed range at the largest budget", fontsize=9)
    ax_diff.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_a", type=Path, help="sweep out folder of family A (its trials.parquet)")
    parser.add_argument("sweep_b", type=Path, help="sweep out folder of family B")
    parser.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"),
                        help="names of the two (default: the tables' family)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("compare"), help="folder for the JSON and PNG")
    args = parser.parse_args(argv)
    a, b = (read_records(folder / "trials.parquet") for folder in (args.sweep_a, args.sweep_b))
    if not a or not b:
        parser.error("both sweep folders need a trials.parquet with records")
    labels: tuple[str, str] = tuple(args.labels) if args.labels else (a[0].family, b[0].family)  # type: ignore[assignment]
    points = match(a, b)
    if not points:
        parser.error("no (size, budget) point is in both tables")
    console = Console(width=160)
    console.print(table(points, labels))
    lines = verdict(points, labels)
    console.print(escape("\n".join(lines)))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "labels": list(labels),
        "points": [{**asdict(p), "loss_diff": p.loss_diff, "acc_diff": p.acc_diff,
                    "beyond_seed_range": p.beyond_seed_range} for p in points],  # fmt: skip
        "lower_loss_points": sum(p.loss_diff < 0 for p in points),
        "matched_points": len(points),
        "verdict": lines,
    }
    (args.out / "comparison.json").write_text(json.dumps(summary, indent=2))
    plot(points, labels, args.out / "comparison.png")
    console.print(f"wrote {args.out / 'comparison.json'} and {args.out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
