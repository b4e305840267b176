"""The README's main job: `defocus-scale demo` trains with 2 Ray workers, evaluates, and reports where
everything is."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from defocus_scale.demo import demo_overrides, run_demo
from defocus_scale.orchestration.cli import prepare_launch
from defocus_scale.train.config import ConfigError


@pytest.mark.distributed
def test_demo_trains_with_two_ray_workers(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    headline = run_demo(
        [f"trainer.run_dir={tmp_path / 'demo'}", "trainer.max_steps=40", "trainer.checkpoint_every=20",
         "trainer.eval_every=20", "trainer.tensorboard=false", "synthetic_data.train_samples=1024",
         "synthetic_data.eval_samples=256"],
        Console(quiet=True),
    )  # fmt: skip
    assert headline["launcher"] == "ray" and headline["world_size"] == 2 and headline["final_step"] == 40
    assert headline["train_loss_last"] < headline["train_loss_first"] - 0.2, headline
    assert headline["eval_top1"] > 0.3, headline  # 10 classes: chance is 0.1
    assert headline["images_per_s"] > 0 and headline["restarts"] == 0
    assert Path(headline["loss_curve"]).stat().st_size > 10_000  # a drawn PNG, not an empty canvas
    checkpoints = sorted(p.name for p in Path(headline["checkpoints"]).iterdir())
    assert checkpoints == ["step_00000020", "step_00000040"]
    assert any(Path(headline["metrics"], "train").glob("*.parquet"))


def test_demo_config_is_a_valid_launch() -> None:
    prepared = prepare_launch(demo_overrides())
    assert prepared.orchestration.launcher.kind == "ray"
    assert prepared.orchestration.launcher.num_workers == 2
    assert Path(prepared.orchestration.run_dir).is_absolute()  # Ray workers have another cwd


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="max_stepz"):
        prepare_launch(demo_overrides(["+trainer.max_stepz=3"]))
    with pytest.raises(ConfigError, match="max_steps"):
        prepare_launch(demo_overrides(["trainer.max_steps=many"]))
    with pytest.raises(ValueError, match="launcher.kind"):
        prepare_launch(demo_overrides(["launcher.kind=slurm"]))
