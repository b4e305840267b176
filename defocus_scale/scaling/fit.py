"""Fit ``L(N, D) = E + A / N^alpha + B / D^beta`` to sweep results, and the compute-optimal allocation
it implies.

The fit follows Chinchilla's approach 3 (Hoffmann et al. 2022): with ``A = e^a``, ``B = e^b``,
``E = e^e`` it minimises ``sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i)``
with BFGS. The Huber loss on log-loss keeps a few outlying runs (a diverged or under-tuned size) from
dragging the fit. Starts: the objective is evaluated on a grid of initialisations and BFGS runs from
the best few; bootstrap refits (trials resampled with replacement) start from the full fit's optima and
give percentile intervals for every constant.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import huber, logsumexp

from defocus_scale.scaling.records import TrialRecord

CONSTANTS = ("E", "A", "B", "alpha", "beta")

# Grid of (e, a, b, alpha, beta) starting points; the objective is cheap to evaluate on all of them.
DEFAULT_INIT_GRID: dict[str, Sequence[float]] = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 2.5, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 2.5, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.1, 0.25, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.1, 0.25, 0.5, 1.0, 1.5, 2.0),
}

CostModel = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ScalingLawFit:
    """Fitted constants, with bootstrap percentile intervals (``intervals[name] = (low, high)``)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    n_points: int
    huber_delta: float
    bootstrap_samples: int = 0
    confidence: float = 0.95
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    def predict(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def to_dict(self) -> dict:
        out = asdict(self)
        out["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        return out


def _residuals(params: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray):
    """Residuals of log-loss for parameter rows ``params: (..., 5)`` and the softmax weights of the terms."""
    e, a, b, alpha, beta = np.moveaxis(params, -1, 0)
    terms = np.stack(
        [a[..., None] - alpha[..., None] * log_n, b[..., None] - beta[..., None] * log_d,
         np.broadcast_to(e[..., None], np.broadcast_shapes(e[..., None].shape, log_n.shape))],
        axis=-1,
    )  # fmt: skip
    lse = logsumexp(terms, axis=-1)
    return lse - log_loss, np.exp(terms - lse[..., None])


def huber_objective(
    params: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Sum of Huber losses of the log-loss residuals (divided by ``delta`` for conditioning) and its
    gradient in ``(e, a, b, alpha, beta)``."""
    residual, weight = _residuals(params, log_n, log_d, log_loss)
    value = huber(delta, residual).sum() / delta
    psi = np.clip(residual, -delta, delta) / delta  # d huber / d residual, scaled like the value
    grad = np.array(
        [
            (psi * weight[:, 2]).sum(),
            (psi * weight[:, 0]).sum(),
            (psi * weight[:, 1]).sum(),
            -(psi * weight[:, 0] * log_n).sum(),
            -(psi * weight[:, 1] * log_d).sum(),
        ]
    )
    return float(value), grad


def _grid(init_grid: dict[str, Sequence[float]]) -> np.ndarray:
    names = ("e", "a", "b", "alpha", "beta")
    missing = [n for n in names if n not in init_grid]
    if missing:
        raise ValueError(f"init_grid lacks {missing}; it needs values for each of {names}")
    return np.array(list(itertools.product(*(init_grid[n] for n in names))), dtype=np.float64)


def _minimise(start: np.ndarray, data: tuple[np.ndarray, ...], delta: float) -> tuple[np.ndarray, float]:
    # Unbounded BFGS: it needed about half the evaluations of L-BFGS-B here and reached lower optima.
    result = minimize(
        huber_objective, start, args=(*data, delta), jac=True, method="BFGS", options={"gtol": 1e-10}
    )
    return result.x, float(result.fun)


def _best_of(
    starts: np.ndarray, data: tuple[np.ndarray, ...], delta: float
) -> list[tuple[np.ndarray, float]]:
    """Local optima from every start, best first."""
    optima = [_minimise(start, data, delta) for start in starts]
    return sorted(optima, key=lambda item: item[1])


def _validate(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> None:
    if not (n.shape == d.shape == loss.shape) or n.ndim != 1:
        raise ValueError(f"n, d and loss must be 1-D of one length, got {n.shape}, {d.shape}, {loss.shape}")
    if len(n) < len(CONSTANTS):
        raise ValueError(f"fitting 5 constants needs at least 5 points, got {len(n)}")
    for name, values in (("n", n), ("d", d), ("loss", loss)):
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(
                f"{name} must be finite and positive; got {values[~(np.isfinite(values) & (values > 0))]}"
            )
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise ValueError("the fit needs at least two distinct model sizes and two distinct data amounts")


def _constants(params: np.ndarray) -> dict[str, float]:
    e, a, b, alpha, beta = params
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha), "beta": float(beta)}


def fit_scaling_law(
    n: Sequence[float] | np.ndarray,
    d: Sequence[float] | np.ndarray,
    loss: Sequence[float] | np.ndarray,
    *,
    huber_delta: float = 1e-3,
    init_grid: dict[str, Sequence[float]] | None = None,
    starts: int = 16,
    bootstrap: int = 200,
    bootstrap_starts: int = 3,
    confidence: float = 0.95,
    seed: int = 0,
) -> ScalingLawFit:
    """Fit ``L = E + A/N^alpha + B/D^beta`` to points ``(n_i, d_i, loss_i)``.

    BFGS runs from the ``starts`` best points of ``init_grid`` (default :data:`DEFAULT_INIT_GRID`);
    ``bootstrap`` resamples of the points are refitted from the ``bootstrap_starts`` best optima of the
    full fit, and their ``confidence`` percentile range is each constant's interval.
    """
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    _validate(n, d, loss)
    data = (np.log(n), np.log(d), np.log(loss))
    grid = _grid(init_grid or DEFAULT_INIT_GRID)
    residual, _ = _residuals(grid, *data)
    grid_values = huber(huber_delta, residual).sum(-1)
    candidates = grid[np.argsort(grid_values, kind="stable")[:starts]]
    optima = _best_of(candidates, data, huber_delta)
    best, objective = optima[0]

    intervals: dict[str, tuple[float, float]] = {}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        refit_starts = np.stack([params for params, _ in optima[:bootstrap_starts]])
        samples = []
        for _ in range(bootstrap):
            pick = rng.integers(0, len(n), len(n))
            if len(np.unique(n[pick])) < 2 or len(np.unique(d[pick])) < 2:
                continue  # a resample with one size or one data amount cannot identify the constants
            resampled = tuple(x[pick] for x in data)
            params, _ = _best_of(refit_starts, resampled, huber_delta)[0]
            samples.append([_constants(params)[name] for name in CONSTANTS])
        tails = 100 * (1 - confidence) / 2
        low, high = np.percentile(np.array(samples), [tails, 100 - tails], axis=0)
        intervals = {name: (float(lo), float(hi)) for name, lo, hi in zip(CONSTANTS, low, high)}
    return ScalingLawFit(
        **_constants(best), objective=objective, n_points=len(n), huber_delta=huber_delta,
        bootstrap_samples=bootstrap, confidence=confidence, intervals=intervals,
    )  # fmt: skip


# -- compute-optimal allocation ------------------------------------------------------------------


def chinchilla_allocation(fit: ScalingLawFit, compute: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Closed form under ``C = 6 N D``: ``N_opt = G (C/6)^(beta/(alpha+beta))``, ``D_opt = (C/6) / N_opt``
    with ``G = (alpha A / (beta B))^(1/(alpha+beta))``."""
    budget = np.asarray(compute, dtype=np.float64) / 6.0
    total = fit.alpha + fit.beta
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / total)
    n_opt = g * budget ** (fit.beta / total)
    return n_opt, budget / n_opt


def compute_optimal_allocation(
    fit: ScalingLawFit,
    compute: np.ndarray | float,
    cost_per_sample: CostModel | None = None,
    n_bounds: tuple[float, float] = (1e2, 1e14),
) -> tuple[np.ndarray, np.ndarray]:
    """``N_opt(C)``, ``D_opt(C)`` minimising the fitted loss at training compute ``C``.

    ``cost_per_sample(N)`` is the training FLOPs per unit of ``D`` (per token, or per image) for a model
    of ``N`` parameters, so ``C = cost_per_sample(N) * D``; the default ``6 N`` uses the closed form.
    Otherwise the loss along ``D = C / cost(N)`` is minimised over ``log N`` in ``n_bounds``.
    """
    if cost_per_sample is None:
        return chinchilla_allocation(fit, compute)
    budgets = np.atleast_1d(np.asarray(compute, dtype=np.float64))
    n_opt, d_opt = np.empty_like(budgets), np.empty_like(budgets)
    lo, hi = math.log(n_bounds[0]), math.log(n_bounds[1])
    for i, budget in enumerate(budgets):

        def loss_at(log_n: float, budget: float = budget) -> float:
            n = math.exp(log_n)
            return float(fit.predict(n, budget / float(cost_per_sample(np.array(n)))))

        best = minimize_scalar(loss_at, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
        n_opt[i] = math.exp(best.x)
        d_opt[i] = budget / float(cost_per_sample(np.array(n_opt[i])))
    shape = np.shape(compute)
    return n_opt.reshape(shape), d_opt.reshape(shape)


# -- from trial records ----------------------------------------------------------------------------

DATA_COLUMNS = ("tokens_seen", "images_seen")
LOSS_COLUMNS = ("val_loss", "train_loss")


def usable_records(records: Sequence[TrialRecord], loss_column: str = "val_loss") -> list[TrialRecord]:
    """Finished trials with a finite positive loss (failed or diverged ones are left out of the fit)."""
    if loss_column not in LOSS_COLUMNS:
        raise ValueError(f"loss_column must be one of {LOSS_COLUMNS}, got {loss_column!r}")
    return [
        r for r in records
        if r.status == "finished" and math.isfinite(getattr(r, loss_column)) and getattr(r, loss_column) > 0
    ]  # fmt: skip


def cost_model_from_records(records: Sequence[TrialRecord], data_column: str = "tokens_seen") -> CostModel:
    """Training FLOPs per unit of ``data_column`` as a power law of non-embedding parameters, fitted in
    log-log to the trials' measured ``compute / data`` (attention and patch-embedding costs make it
    deviate from ``6 N``)."""
    if data_column not in DATA_COLUMNS:
        raise ValueError(f"data_column must be one of {DATA_COLUMNS}, got {data_column!r}")
    params = np.array([r.params for r in records], dtype=np.float64)
    cost = np.array([r.compute / getattr(r, data_column) for r in records], dtype=np.float64)
    if len(np.unique(params)) < 2:
        ratio = float(np.mean(cost / params))
        return lambda n: ratio * np.asarray(n, dtype=np.float64)
    slope, intercept = np.polyfit(np.log(params), np.log(cost), 1)
    return lambda n: np.exp(intercept + slope * np.log(np.asarray(n, dtype=np.float64)))


def fit_records(
    records: Sequence[TrialRecord],
    *,
    loss_column: str = "val_loss",
    data_column: str = "tokens_seen",
    **fit_options,
) -> ScalingLawFit:
    """:func:`fit_scaling_law` on the usable trials: ``N = params``, ``D = data_column``,
    ``L = loss_column``."""
    if data_column not in DATA_COLUMNS:
        raise ValueError(f"data_column must be one of {DATA_COLUMNS}, got {data_column!r}")
    usable = usable_records(records, loss_column)
    return fit_scaling_law(
        [r.params for r in usable], [getattr(r, data_column) for r in usable],
        [getattr(r, loss_column) for r in usable], **fit_options,
    )  # fmt: skip
