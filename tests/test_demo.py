"""The README's main job: a few CPU training steps on the built-in data lower the loss."""

from __future__ import annotations

import pytest
from omegaconf.errors import ConfigKeyError, ValidationError
from rich.console import Console

from defocus_scale.demo import load_demo_config, run_demo


def test_demo_training_lowers_the_loss():
    cfg = load_demo_config(["steps=40", "eval_images=256"])
    summary = run_demo(cfg, Console(quiet=True))
    assert summary["train_loss_last"] < summary["train_loss_first"] - 0.2
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.2
    assert summary["eval_acc_after"] > summary["eval_acc_before"] + 0.1
    assert summary["eval_acc_after"] > 0.2  # 10 classes: clearly above chance


def test_demo_config_errors_name_the_key():
    with pytest.raises(ConfigKeyError, match="stepz"):
        load_demo_config(["stepz=3"])
    with pytest.raises(ValidationError, match="batch_size"):
        load_demo_config(["batch_size=many"])
