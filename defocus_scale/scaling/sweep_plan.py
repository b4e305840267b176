"""Plan a scaling-law sweep: from a sweep config (``configs/sweep/*.yaml``) to the list of trials to run.

Each trial is one model size trained on one budget with its own learning rate. Its id is a digest of
everything that changes its result (model and its keyword arguments, images, batch size, lr, seed,
trainer settings), so replanning the same config gives the same ids and a resumed sweep skips the
trials whose record says finished. Running the trials is the sweep runner's job, not this module's.

Sizes are counted the way scaling laws count them:

* ``params``: non-embedding parameters, i.e. everything but the patch embedding, class token, position
  embedding and the classifier heads (Kaplan et al. leave out embeddings; our "vocabulary" is the
  patch projection and the classes).
* ``flops_per_image``: one training-mode forward pass (aux head included), counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on a model built on the meta device. It counts matrix
  products, convolutions and attention (2 FLOPs per multiply-add). The selective scan's state update
  ``s = exp(delta A) s + delta B u`` is elementwise, so the counter does not see it: we add it
  analytically, 5 FLOPs per (token, channel, state) (``delta A``, ``exp``, ``delta u B``, multiply-add);
  its read-out ``C . s`` is a matrix product the counter already counts.
* training compute: ``3 * flops_per_image * images`` (backward ~ twice the forward).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from defocus_scale.models import DefocusMambaMixer, create_model, list_models, model_defaults

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "sweep"
EMBEDDING_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "head.", "head2.")
SCAN_FLOPS_PER_STATE = 5
MAMBA_FAMILIES = ("defocus_mamba", "mamba")
HEADED_FAMILIES = ("defocus_vit", "causal_vit", "deit", "defocus_retnet", "retnet")


@dataclass
class SizeConfig:
    width: int = MISSING
    depth: int = MISSING
    overrides: dict[str, Any] = field(default_factory=dict)  # any other model kwargs for this size


@dataclass
class BudgetConfig:
    kind: str = MISSING  # "compute": training FLOPs per trial; "images": training images per trial
    values: list[float] = MISSING


@dataclass
class LrRuleConfig:
    """``lr = base * (width_ref / width) ** exponent`` (muP-like: wider models take smaller steps)."""

    base: float = MISSING
    width_ref: int = MISSING
    exponent: float = 1.0


@dataclass
class SweepConfig:
    """Typed schema of ``configs/sweep/*.yaml``."""

    name: str = MISSING
    family: str = MISSING  # a registered model family, e.g. defocus_vit or defocus_mamba
    model_overrides: dict[str, Any] = field(default_factory=dict)  # for every size: img_size, classes...
    head_dim: int = 32  # ViT/RetNet families: num_heads = width // head_dim
    mamba_expand: int = 2  # Mamba families: inner_dim = mamba_expand * width
    sizes: list[SizeConfig] = MISSING
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    lr: LrRuleConfig = field(default_factory=LrRuleConfig)
    batch_size: int = MISSING
    min_steps: int = 1  # budgets giving fewer optimizer steps than this are left out of the plan
    seeds: list[int] = field(default_factory=lambda: [0])
    # Seeds run, in addition to ``seeds``, at the largest budget only (a seed spread where it is cheapest
    # to read against the gaps the sweep measures); a seed already in ``seeds`` is not run twice.
    largest_budget_seeds: list[int] = field(default_factory=list)
    data: str = "synthetic"  # the configs/data option trials train on; train.data keys are merged onto it
    warmup_fraction: float = 0.1  # of each trial's steps (schedule.warmup_steps, at least 1 step)
    # Trainer settings (keys of configs/train.yaml's trainer part: data, optim, schedule, trainer,
    # synthetic_data), merged onto its defaults; the runner sets the model, lr, steps, batch and seed.
    train: dict[str, Any] = field(default_factory=dict)
    # Launcher settings (launcher, cluster, faults sections of OrchestrationConfig); they do not change a
    # trial's result, so they are not part of its id.
    orchestration: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialSpec:
    """One trial of a sweep: build ``create_model(model, **model_kwargs)`` and train it on ``images``
    images (``steps`` steps of ``batch_size``) at learning rate ``lr`` with the ``train`` settings."""

    trial_id: str
    sweep: str
    family: str
    model: str
    model_kwargs: dict[str, Any]
    width: int
    depth: int
    params: int
    flops_per_image: float
    tokens_per_image: int
    images: int
    steps: int
    warmup_steps: int
    batch_size: int
    compute: float
    lr: float
    seed: int
    data: str
    train: dict[str, Any]


def load_sweep_config(name_or_path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """A sweep config by name (``configs/sweep/<name>.yaml``) or path, merged onto the typed schema and
    then ``key=value`` overrides; an unknown key or wrongly typed value is an error naming it."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"sweep config {path} does not exist (known sweeps: {known})")
    merged = OmegaConf.merge(
        OmegaConf.structured(SweepConfig), OmegaConf.load(path), OmegaConf.from_dotlist(overrides or [])
    )
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


# -- counting ------------------------------------------------------------------------------------


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the patch embedding, class token, position embedding and heads."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(EMBEDDING_PREFIXES))


def tokens_per_image(model: nn.Module) -> int:
    """Patches plus the class token."""
    return (model.img_size // model.patch_size) ** 2 + 1


@dataclass(frozen=True)
class FlopCount:
    counted: float  # FlopCounterMode: matmuls, convolutions, attention
    scan_analytic: float  # the selective scan's elementwise state update, which the counter misses

    @property
    def total(self) -> float:
        return self.counted + self.scan_analytic


def count_forward_flops(model: nn.Module) -> FlopCount:
    """FLOPs of one training-mode forward pass on one image (any device, meta included)."""
    device = next(model.parameters()).device
    images = torch.empty(1, model.patch_embed.proj.in_channels, model.img_size, model.img_size, device=device)
    was_training = model.training
    model.train()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.forward_train(images, drop_path_rate=0.0)
    finally:
        model.train(was_training)
    tokens = tokens_per_image(model)
    scan = sum(
        SCAN_FLOPS_PER_STATE * tokens * m.inner_dim * m.state_size
        for m in model.modules()
        if isinstance(m, DefocusMambaMixer)
    )
    return FlopCount(counted=float(counter.get_total_flops()), scan_analytic=float(scan))


def build_on_meta(model_name: str, **model_kwargs: Any) -> nn.Module:
    """The model with shapes only (no memory, no initialisation cost): for counting."""
    with torch.device("meta"):
        return create_model(model_name, **model_kwargs)


# -- planning ------------------------------------------------------------------------------------


def base_variant(family: str) -> str:
    """The family's ``tiny`` variant, whose defaults every size of a sweep starts from."""
    variants = list_models(family)
    if not variants:
        families = sorted({*MAMBA_FAMILIES, *HEADED_FAMILIES})
        raise ValueError(f"sweep family {family!r} has no registered models (families: {families})")
    name = f"{family}_tiny"
    return name if name in variants else variants[0]


def size_kwargs(cfg: SweepConfig, size: SizeConfig) -> dict[str, Any]:
    """Model keyword arguments of one size: width and depth, the family's rule for the rest (heads, or
    Mamba's inner width ``expand * width``, dt rank ``ceil(width / 16)`` and a group norm size that
    divides the inner width), then the sweep's and the size's overrides."""
    if size.width <= 0 or size.depth <= 0:
        raise ValueError(f"sweep {cfg.name}: sizes need positive width and depth, got {size}")
    kwargs: dict[str, Any] = {"embed_dim": size.width, "depth": size.depth}
    if cfg.family in HEADED_FAMILIES:
        if size.width % cfg.head_dim:
            raise ValueError(
                f"sweep {cfg.name}: width {size.width} is not a multiple of head_dim {cfg.head_dim}"
            )
        kwargs["num_heads"] = size.width // cfg.head_dim
    elif cfg.family in MAMBA_FAMILIES:
        inner = cfg.mamba_expand * size.width
        kwargs.update(inner_dim=inner, dt_rank=math.ceil(size.width / 16))
        default_group = model_defaults(base_variant(cfg.family)).get("group_size", 64)
        if default_group:
            kwargs["group_size"] = math.gcd(default_group, inner)
    return {**kwargs, **cfg.model_overrides, **size.overrides}


def lr_for_width(cfg: SweepConfig, width: int) -> float:
    return cfg.lr.base * (cfg.lr.width_ref / width) ** cfg.lr.exponent


def trial_id(family: str, width: int, depth: int, identity: dict[str, Any]) -> str:
    """Readable prefix plus a digest of everything that changes the trial's result."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    return f"{family}-w{width}-d{depth}-{identity['images']}img-s{identity['seed']}-{digest}"


def plan_trials(cfg: SweepConfig) -> list[TrialSpec]:
    """Every trial of the sweep (sizes x budgets x seeds, plus ``largest_budget_seeds`` at the largest
    budget), in a stable order; budgets too small for ``min_steps`` steps of ``batch_size`` are logged
    and left out."""
    if cfg.budgets.kind not in ("compute", "images"):
        raise ValueError(
            f"sweep {cfg.name}: budgets.kind must be 'compute' or 'images', got {cfg.budgets.kind!r}"
        )
    if cfg.batch_size <= 0:
        raise ValueError(f"sweep {cfg.name}: batch_size must be positive, got {cfg.batch_size}")
    if not 0.0 <= cfg.warmup_fraction < 1.0:
        raise ValueError(f"sweep {cfg.name}: warmup_fraction must lie in [0, 1), got {cfg.warmup_fraction}")
    model_name = base_variant(cfg.family)
    largest_budget = max(cfg.budgets.values, default=None)
    extra_seeds = [s for s in dict.fromkeys(cfg.largest_budget_seeds) if s not in cfg.seeds]
    trials: list[TrialSpec] = []
    for size in cfg.sizes:
        kwargs = size_kwargs(cfg, size)
        try:
            model = build_on_meta(model_name, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"sweep {cfg.name}: size {size.width}x{size.depth} does not build: {exc}"
            ) from exc
        flops = count_forward_flops(model).total
        params, tokens = non_embedding_params(model), tokens_per_image(model)
        lr = lr_for_width(cfg, size.width)
        for budget in cfg.budgets.values:
            wanted = budget / (3 * flops) if cfg.budgets.kind == "compute" else budget
            steps = int(wanted // cfg.batch_size)
            if steps < cfg.min_steps:
                log.warning(
                    "sweep %s: %dx%d at %s %g gives %d steps (< min_steps %d); left out",
                    cfg.name, size.width, size.depth, cfg.budgets.kind, budget, steps, cfg.min_steps,
                )  # fmt: skip
                continue
            images = steps * cfg.batch_size
            warmup = max(1, round(cfg.warmup_fraction * steps)) if cfg.warmup_fraction else 0
            seeds = [*cfg.seeds, *extra_seeds] if budget == largest_budget else cfg.seeds
            # the operators' implementation (``backend``) changes how fast a trial runs, not what it
            # computes (the backends agree to rounding, tested): not part of its identity
            identified = {k: v for k, v in kwargs.items() if k != "backend"}
            for seed in seeds:
                identity = dict(
                    model=model_name, model_kwargs=identified, images=images, batch_size=cfg.batch_size,
                    lr=lr, seed=seed, data=cfg.data, train=cfg.train, warmup_steps=warmup,
                )  # fmt: skip
                trials.append(
                    TrialSpec(
                        trial_id=trial_id(cfg.family, size.width, size.depth, identity),
                        sweep=cfg.name,
                        family=cfg.family,
                        model=model_name,
                        model_kwargs=dict(kwargs),
                        width=size.width,
                        depth=size.depth,
                        params=params,
                        flops_per_image=flops,
                        tokens_per_image=tokens,
                        images=images,
                        steps=steps,
                        warmup_steps=warmup,
                        batch_size=cfg.batch_size,
                        compute=3.0 * flops * images,
                        lr=lr,
                        seed=seed,
                        data=cfg.data,
                        train=dict(cfg.train),
                    )  # fmt: skip
                )
    return trials
