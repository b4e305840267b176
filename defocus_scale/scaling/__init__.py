"""Scaling-law sweeps: trial records, sweep planning, running the trials (``defocus-scale sweep``), the
``L(N, D)`` fit and its plots."""

from defocus_scale.scaling.fit import (
    ScalingLawFit,
    chinchilla_allocation,
    compute_optimal_allocation,
    cost_model_from_records,
    fit_records,
    fit_scaling_law,
)
from defocus_scale.scaling.records import TrialRecord, append_record, finished_trial_ids, read_records
from defocus_scale.scaling.runner import SweepConfigError, SweepLayout, prepare_trials, run_sweep
from defocus_scale.scaling.sweep_plan import SweepConfig, TrialSpec, load_sweep_config, plan_trials

__all__ = [
    "ScalingLawFit",
    "SweepConfig",
    "SweepConfigError",
    "SweepLayout",
    "TrialRecord",
    "TrialSpec",
    "append_record",
    "chinchilla_allocation",
    "compute_optimal_allocation",
    "cost_model_from_records",
    "finished_trial_ids",
    "fit_records",
    "fit_scaling_law",
    "load_sweep_config",
    "plan_trials",
    "prepare_trials",
    "read_records",
    "run_sweep",
]
