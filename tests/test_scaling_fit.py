"""Scaling-law fit, trial records and sweep planning."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from defocus_scale.models import create_model
from defocus_scale.scaling.fit import (
    chinchilla_allocation,
    compute_optimal_allocation,
    fit_records,
    fit_scaling_law,
)
from defocus_scale.scaling.records import (
    RecordTableError,
    TrialRecord,
    append_record,
    finished_trial_ids,
    read_records,
)
from defocus_scale.scaling.report import report_sweep
from defocus_scale.scaling.sweep_plan import (
    SizeConfig,
    build_on_meta,
    count_forward_flops,
    load_sweep_config,
    non_embedding_params,
    plan_trials,
)

TRUE = {"E": 1.7, "A": 400.0, "B": 4000.0, "alpha": 0.34, "beta": 0.28}


def synthetic_points(noise: float = 0.0, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.repeat(np.geomspace(1e5, 3e7, 6), 6)
    d = np.tile(np.geomspace(1e7, 1e10, 6), 6)
    loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
    loss = loss * np.exp(np.random.default_rng(seed).normal(0.0, noise, loss.shape))
    return n, d, loss


def test_fit_recovers_constants_without_noise():
    fit = fit_scaling_law(*synthetic_points(), bootstrap=0)
    for name, value in TRUE.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-6), name


def test_fit_with_noise_lies_in_bootstrap_interval():
    fit = fit_scaling_law(*synthetic_points(noise=0.01), bootstrap=60, seed=0)
    assert set(fit.intervals) == set(TRUE)
    for name, value in TRUE.items():
        low, high = fit.intervals[name]
        assert low <= value <= high, (name, low, value, high)
        assert low < high


def test_fit_is_robust_to_one_outlier():
    n, d, loss = synthetic_points()
    loss[5] *= 1.5  # one diverged run
    fit = fit_scaling_law(n, d, loss, bootstrap=0)
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.02)
    assert fit.beta == pytest.approx(TRUE["beta"], rel=0.02)


def test_fit_rejects_bad_input():
    n, d, loss = synthetic_points()
    with pytest.raises(ValueError, match="positive"):
        fit_scaling_law(n, d, -loss, bootstrap=0)
    with pytest.raises(ValueError, match="two distinct"):
        fit_scaling_law(np.full(8, 1e6), d[:8], loss[:8], bootstrap=0)


def test_compute_optimal_numeric_matches_closed_form():
    fit = fit_scaling_law(*synthetic_points(), bootstrap=0)
    budgets = np.array([1e16, 1e19, 1e22])
    n_closed, d_closed = chinchilla_allocation(fit, budgets)
    n_numeric, d_numeric = compute_optimal_allocation(fit, budgets, lambda n: 6.0 * n)
    np.testing.assert_allclose(n_numeric, n_closed, rtol=1e-4)
    np.testing.assert_allclose(6 * n_closed * d_closed, budgets, rtol=1e-12)
    # The optimum is a minimum along the iso-compute line.
    for c, n in zip(budgets, n_closed):
        best = fit.predict(n, c / (6 * n))
        assert best < fit.predict(n * 1.2, c / (6 * n * 1.2)) and best < fit.predict(
            n / 1.2, c / (6 * n / 1.2)
        )
    # Exponent of N_opt(C) is beta / (alpha + beta).
    slope = np.diff(np.log(n_closed)) / np.diff(np.log(budgets))
    np.testing.assert_allclose(slope, TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), rtol=1e-6)


def make_record(trial_id: str, **changes) -> TrialRecord:
    base = dict(
        trial_id=trial_id, sweep="s", family="defocus_vit", model="defocus_vit_tiny", width=32, depth=2,
        params=1000, flops_per_image=1e6, images_seen=100, tokens_seen=6500, compute=3e8, lr=1e-3,
        train_loss=2.0, train_acc=0.3, val_loss=2.1, val_acc=0.25, wall_time_s=1.0, status="finished",
    )  # fmt: skip
    return TrialRecord(**{**base, **changes})


def test_records_append_replace_and_read(tmp_path):
    table = tmp_path / "sweep" / "trials.parquet"
    assert read_records(table) == []
    append_record(table, make_record("a", status="failed", val_loss=float("nan")))
    append_record(table, make_record("b"))
    append_record(table, make_record("a", val_loss=1.5))  # the rerun replaces the failed record
    records = read_records(table)
    assert [r.trial_id for r in records] == ["b", "a"]
    assert records[1].val_loss == 1.5 and records[1].status == "finished"
    assert finished_trial_ids(table) == {"a", "b"}
    assert pq.read_table(table).num_rows == 2
    assert not list(table.parent.glob("*.tmp"))


def test_corrupt_table_is_reported_and_kept(tmp_path):
    table = tmp_path / "trials.parquet"
    table.write_bytes(b"not parquet")
    with pytest.raises(RecordTableError, match="trials.parquet"):
        append_record(table, make_record("a"))
    assert table.read_bytes() == b"not parquet"
    with pytest.raises(ValueError, match="status"):
        make_record("a", status="done")


def test_report_sweep_from_records(tmp_path):
    n, d, loss = synthetic_points(noise=0.005)
    table = tmp_path / "trials.parquet"
    for i, (params, tokens, value) in enumerate(zip(n, d, loss)):
        images = int(tokens // 65)
        append_record(table, make_record(
            f"t{i}", params=int(params), tokens_seen=int(tokens), images_seen=images,
            flops_per_image=2 * 65 * params, compute=6 * params * images * 65, val_loss=float(value),
        ))  # fmt: skip
    append_record(table, make_record("failed", status="failed", val_loss=float("nan")))
    fit = report_sweep(table, tmp_path / "out", bootstrap=10)
    assert fit.n_points == len(n)
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.1)
    for name in ("fit.json", "loss_vs_compute.png", "fitted_vs_observed.png", "compute_optimal.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000, name
    refit = fit_records(read_records(table), bootstrap=0)  # failed trials are left out
    assert refit.n_points == len(n)


def test_plan_is_deterministic_and_ids_change_with_settings():
    cfg = load_sweep_config("tiny_cpu")
    first, second = plan_trials(cfg), plan_trials(load_sweep_config("tiny_cpu"))
    assert [t.trial_id for t in first] == [t.trial_id for t in second]
    assert len({t.trial_id for t in first}) == len(first) > 0
    for trial in first:
        assert trial.compute == pytest.approx(3 * trial.flops_per_image * trial.images)
        assert trial.images == trial.steps * trial.batch_size and trial.steps >= cfg.min_steps
        budget = min(cfg.budgets.values, key=lambda b: abs(math.log(b / trial.compute)))
        assert trial.compute <= budget and trial.compute > budget * 0.8
    widths = sorted({t.width for t in first})
    lrs = {t.width: t.lr for t in first}
    assert lrs[widths[0]] > lrs[widths[-1]]  # the lr rule shrinks the step with width
    changed = plan_trials(dataclasses.replace(cfg, train={**cfg.train, "weight_decay": 0.1}))
    assert not {t.trial_id for t in changed} & {t.trial_id for t in first}


def test_largest_budget_seeds_add_trials_at_the_largest_budget_only():
    cfg = load_sweep_config("tiny_cpu")
    base = plan_trials(cfg)
    extra = plan_trials(dataclasses.replace(cfg, largest_budget_seeds=[1, 0, 1]))  # 0 is in seeds already
    largest = max(cfg.budgets.values)
    base_ids = {t.trial_id for t in base}
    assert base_ids <= {t.trial_id for t in extra}  # the other trials keep their ids
    added = [t for t in extra if t.trial_id not in base_ids]
    sizes_at_largest = {(t.width, t.depth) for t in base if t.compute > largest * 0.8}
    assert len(added) == len(sizes_at_largest) > 0
    for trial in added:
        assert trial.seed == 1 and trial.compute > largest * 0.8
        twin = next(t for t in base if (t.width, t.depth, t.images, t.seed) == (trial.width, trial.depth,
                                                                              trial.images, 0))
        assert dataclasses.replace(twin, trial_id=trial.trial_id, seed=1) == trial
    assert load_sweep_config("tiny_cpu", ["largest_budget_seeds=[2]"]).largest_budget_seeds == [2]


def test_operator_backend_is_not_part_of_a_trials_identity():
    """The same trial with the PyTorch or the numba scan is one trial (the backends agree to rounding):
    a sweep resumed with another backend does not rerun what finished. The FLOP count, made on the meta
    device, does not depend on it either."""
    cfg = load_sweep_config("defocus_mamba_cifar_cpu")
    auto = plan_trials(cfg)
    torch_scan = plan_trials(load_sweep_config("defocus_mamba_cifar_cpu", ["model_overrides.backend=torch"]))
    assert [t.trial_id for t in auto] == [t.trial_id for t in torch_scan]
    assert [t.flops_per_image for t in auto] == [t.flops_per_image for t in torch_scan]
    assert all(t.model_kwargs["backend"] == "torch" for t in torch_scan)


def test_plan_rejects_bad_config():
    cfg = load_sweep_config("tiny_cpu")
    with pytest.raises(ValueError, match="head_dim"):
        plan_trials(dataclasses.replace(cfg, sizes=[SizeConfig(width=40, depth=2)]))
    with pytest.raises(ValueError, match="budgets.kind"):
        plan_trials(load_sweep_config("tiny_cpu", ["budgets.kind=epochs"]))
    with pytest.raises(FileNotFoundError, match="no_such_sweep"):
        load_sweep_config("no_such_sweep")


def test_param_and_flop_counts():
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    meta, real = build_on_meta("defocus_vit_tiny", **kwargs), create_model("defocus_vit_tiny", **kwargs)
    assert non_embedding_params(meta) == non_embedding_params(real)
    assert non_embedding_params(real) == sum(p.numel() for p in real.blocks.parameters()) + 2 * 32
    flops = count_forward_flops(meta)
    tokens, width, hidden = 17, 32, 128
    linear = 2 * tokens * 2 * (width * 3 * width + width * width + 2 * width * hidden)  # 2 blocks
    attention = 2 * 2 * (2 * tokens * tokens * width)  # QK^T and PV, 2 blocks
    patch = 2 * 16 * 3 * 64 * width
    heads = 2 * width * 10 * (1 + 16)  # class head + per-token aux head
    assert flops.counted == linear + attention + patch + heads
    assert flops.scan_analytic == 0
    mamba = build_on_meta("defocus_mamba_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, dt_rank=4,
                          group_size=32, num_classes=10)  # fmt: skip
    assert count_forward_flops(mamba).scan_analytic == 2 * 5 * tokens * 64 * 16
