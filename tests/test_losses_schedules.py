"""The De-focus loss (main + aux) and the per-step schedules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from defocus_scale.losses import defocus_loss
from defocus_scale.models import ModelOutput
from defocus_scale.schedules import CosineSchedule, DropPathSchedule


def test_released_loss_averages_main_and_per_token_aux():
    torch.manual_seed(0)
    logits, aux = torch.randn(4, 7), torch.randn(4, 5, 7)
    target = torch.tensor([0, 3, 6, 2])
    parts = defocus_loss(ModelOutput(logits, aux), target)
    per_token = torch.stack([F.cross_entropy(aux[:, j], target) for j in range(5)]).mean()
    torch.testing.assert_close(parts.aux, per_token)
    torch.testing.assert_close(parts.total, (F.cross_entropy(logits, target) + per_token) / 2)


def test_pooled_aux_and_no_aux():
    logits, aux = torch.randn(3, 4), torch.randn(3, 4)
    target = torch.tensor([1, 0, 3])
    parts = defocus_loss(ModelOutput(logits, aux), target, label_smoothing=0.1)
    expected_aux = F.cross_entropy(aux, target, label_smoothing=0.1)
    torch.testing.assert_close(parts.aux, expected_aux)
    alone = defocus_loss(ModelOutput(logits, None), target)
    assert alone.aux is None and torch.equal(alone.total, alone.main)


def test_soft_targets_match_hard_targets_when_one_hot():
    logits, aux = torch.randn(3, 4), torch.randn(3, 6, 4)
    target = torch.tensor([1, 0, 3])
    hard = defocus_loss(ModelOutput(logits, aux), target)
    soft = defocus_loss(ModelOutput(logits, aux), F.one_hot(target, 4).float())
    torch.testing.assert_close(soft.total, hard.total)
    mixed = torch.full((3, 4), 0.25)
    assert defocus_loss(ModelOutput(logits, aux), mixed).total > 0


def test_drop_path_grows_linearly_per_step():
    schedule = DropPathSchedule(start=0.1, end=0.75)
    rates = [schedule.rate(s, 11) for s in range(11)]
    assert rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.75)
    assert rates[5] == pytest.approx(0.425)
    assert all(b > a for a, b in zip(rates, rates[1:]))
    assert DropPathSchedule(0.1, 0.3, "constant").rate(0, 10) == 0.3
    with pytest.raises(ValueError, match="kind"):
        DropPathSchedule(kind="cosine")
    with pytest.raises(ValueError, match="end"):
        DropPathSchedule(end=1.5)


def test_cosine_with_warmup():
    lr = CosineSchedule(peak=1.0, warmup_steps=10, total_steps=110, final=0.01)
    assert lr(0) == 0.0 and lr(5) == pytest.approx(0.5) and lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.505) and lr(110) == pytest.approx(0.01)
    assert lr(500) == pytest.approx(0.01)
