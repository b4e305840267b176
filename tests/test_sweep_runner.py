"""The sweep runner: a tiny sweep end to end through ``defocus-scale sweep`` (real trainer, Ray Train),
resuming, the trial records, and the bookkeeping of failed trials and bad settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from defocus_scale.cli import main
from defocus_scale.orchestration.launch import LaunchResult
from defocus_scale.scaling import runner
from defocus_scale.scaling.records import read_records
from defocus_scale.scaling.runner import SweepConfigError, SweepLayout, prepare_trials, run_sweep
from defocus_scale.scaling.sweep_plan import load_sweep_config, plan_trials

# Two sizes x three compute budgets at 16 px (17 tokens); the larger size gets one optimizer step at the
# smallest budget, under min_steps, so five trials remain: enough for the five-constant fit.
TINY_SWEEP = {
    "name": "tiny_test",
    "family": "defocus_vit",
    "model_overrides": {"img_size": 16, "patch_size": 4, "num_classes": 4, "aux_head": "tokens"},
    "head_dim": 16,
    "sizes": [{"width": 16, "depth": 1}, {"width": 32, "depth": 2}],
    "budgets": {"kind": "compute", "values": [1.0e8, 2.0e8, 4.0e8]},
    "lr": {"base": 2.0e-3, "width_ref": 16, "exponent": 0.5},
    "batch_size": 32,
    "min_steps": 2,
    "train": {
        "data": {"image_size": 16, "num_classes": 4, "shuffle_buffer": 64, "mixup": 0.0, "cutmix": 0.0},
        "synthetic_data": {"train_samples": 256, "eval_samples": 64, "samples_per_shard": 64},
        "trainer": {
            "checkpoint_every": 0,
            "tensorboard": False,
            "progress": False,
            "threads": 1,
            "ema_decay": 0.0,
        },
    },  # fmt: skip
    "orchestration": {"launcher": {"max_failures": 0}},
}


def write_sweep(folder: Path, changes: dict | None = None) -> Path:
    path = folder / "tiny_test.yaml"
    OmegaConf.save(OmegaConf.create({**TINY_SWEEP, **(changes or {})}), path)
    return path


def test_tiny_sweep_end_to_end_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, out = write_sweep(tmp_path), tmp_path / "sweep"
    command = ["sweep", str(config), "--out", str(out), "--concurrent", "2", "--bootstrap", "10"]
    assert main(command) == 0
    plan = {t.trial_id: t for t in plan_trials(load_sweep_config(config))}
    assert len(plan) == 5  # w32 at the smallest budget is left out (one step < min_steps)

    records = read_records(out / "trials.parquet")
    assert sorted(r.trial_id for r in records) == sorted(plan)
    for record in records:
        spec = plan[record.trial_id]
        assert record.status == "finished", record.error
        assert (record.params, record.width, record.lr) == (spec.params, spec.width, spec.lr)
        assert record.images_seen == spec.images == spec.steps * 32
        assert record.tokens_seen == spec.images * 17
        assert record.compute == pytest.approx(3 * spec.flops_per_image * spec.images)
        assert math.isfinite(record.train_loss) and 0 < record.val_loss < 5 and 0 <= record.val_acc <= 1
        assert math.isnan(record.train_acc) and record.wall_time_s > 0
        run_dir = out / "runs" / record.trial_id
        assert json.loads((run_dir / runner.TRIAL_FILE).read_text())["spec"]["steps"] == spec.steps
        assert list((run_dir / "metrics").rglob("*.parquet")), "the trainer's metrics table is missing"
    fit = json.loads((out / "fit.json").read_text())
    assert fit["trials"] == 5 and set(fit["fit"]["intervals"]) == {"E", "A", "B", "alpha", "beta"}
    for name in ("loss_vs_compute.png", "fitted_vs_observed.png", "compute_optimal.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "ran 5 trials; 0 were already finished" in capsys.readouterr().out

    # Rerunning resumes: nothing trains again and the table is unchanged.
    results_before = sorted(p.name for p in (out / "runs").rglob("result-*.json"))
    table_before = (out / "trials.parquet").read_bytes()
    assert main(command) == 0
    assert "ran 0 trials; 5 were already finished" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "runs").rglob("result-*.json")) == results_before
    assert (out / "trials.parquet").read_bytes() == table_before
    assert main([*command[:4], "--report-only", "--bootstrap", "0"]) == 0


def fake_launch(fail_widths: set[int]):
    """A launcher stand-in returning the summary the trainer would, or raising for some widths."""
    calls = []

    def launch(orchestration, trainer_cfg, entry=None):
        calls.append(orchestration.run_name)
        if trainer_cfg["model"]["overrides"]["embed_dim"] in fail_widths:
            raise RuntimeError("worker died\nTraceback ...\nValueError: shard train-000001.tar is corrupt")
        steps, batch = trainer_cfg["trainer"]["max_steps"], trainer_cfg["trainer"]["global_batch"]
        summary = {"final_step": steps, "global_batch": batch, "loss_last": 1.0, "eval/loss": 1.2,
                   "eval/top1": 0.5}  # fmt: skip
        return LaunchResult("torchrun", orchestration.run_dir, "x", 1.5, summary, [])

    return launch, calls


def test_failed_trials_are_recorded_and_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_sweep_config(write_sweep(tmp_path))
    layout = SweepLayout.at(tmp_path / "sweep")
    launch, calls = fake_launch(fail_widths={32})
    monkeypatch.setattr(runner, "launch", launch)
    outcome = run_sweep(cfg, layout, concurrent=2, launcher="torchrun")
    assert len(calls) == len(outcome.records) == 5
    by_status = {r.trial_id: r for r in read_records(layout.table)}
    failed = [r for r in by_status.values() if r.status == "failed"]
    assert len(failed) == 2 and all(r.width == 32 for r in failed)
    assert all(r.error.endswith("shard train-000001.tar is corrupt") and r.images_seen == 0 for r in failed)
    assert runner.error_cause(failed[0].error) == "ValueError: shard train-000001.tar is corrupt"
    # The rerun trains only the failed trials; their new records replace the old ones.
    launch, calls = fake_launch(fail_widths=set())
    monkeypatch.setattr(runner, "launch", launch)
    outcome = run_sweep(cfg, layout, launcher="torchrun")
    assert sorted(calls) == sorted(r.trial_id for r in failed) and len(outcome.skipped) == 3
    records = read_records(layout.table)
    assert len(records) == 5 and all(r.status == "finished" and not r.error for r in records)


def test_trial_summaries_become_records() -> None:
    spec = plan_trials(load_sweep_config("tiny_cpu"))[0]
    done = {"final_step": spec.steps, "global_batch": spec.batch_size, "loss_last": 2.0, "eval/loss": 2.1,
            "eval/top1": 0.3}  # fmt: skip
    assert runner.trial_record(spec, done, 3.0).status == "finished"
    assert runner.trial_record(spec, {**done, "eval/loss": float("nan")}, 3.0).status == "diverged"
    short = runner.trial_record(spec, {**done, "final_step": spec.steps - 1}, 3.0)
    assert short.status == "failed" and "stopped at step" in short.error
    assert runner.trial_record(spec, {}, 3.0).error == "the trainer returned no summary"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train": {"optim": {"lr": 1.0}}}, "train.optim.lr is set per trial"),
        ({"train": {"trainer": {"max_stepz": 3}}}, "max_stepz"),
        ({"train": {"data": {"image_size": 32}}}, "img_size=16 but the data has image_size=32"),
        (
            {
                "data": "cifar_subset",
                "train": {"data": {"source": "no/such/shards", "image_size": 16, "num_classes": 4}},
            },
            "no/such/shards",
        ),
        ({"orchestration": {"launcher": {"num_wrkers": 2}}}, "num_wrkers"),
    ],
)
def test_bad_settings_fail_before_any_trial_runs(tmp_path: Path, changes: dict, message: str) -> None:
    cfg = load_sweep_config(write_sweep(tmp_path, changes))
    with pytest.raises(SweepConfigError, match=message):
        prepare_trials(cfg, plan_trials(cfg), SweepLayout.at(tmp_path / "sweep"))
    assert main(["sweep", str(tmp_path / "tiny_test.yaml"), "--out", str(tmp_path / "sweep")]) == 2
    assert not (tmp_path / "sweep" / "trials.parquet").exists()
