"""``defocus-scale eval`` on the four kinds of input (a run directory / DCP checkpoint, live and EMA; an
exported file; a released ``.pth`` built from the spec's parameter names with random weights), on shards, an
ImageFolder tree and Parquet files, on one rank and on two through the torchrun launcher; the 22k -> 1k class
map; ``defocus-scale convert``; ``trainer.init_from`` from each kind."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_official_checkpoint import CLASSES, published_state_dict, save_release_checkpoint
from test_train_runs import TINY_MODEL, torchrun

from defocus_scale.cli import main as cli_main
from defocus_scale.data.config import DataConfig
from defocus_scale.data.loader import build_eval_loader
from defocus_scale.evaluate import EvalRequest, run_eval
from defocus_scale.models import create_model, load_official_checkpoint
from defocus_scale.train.checkpoint import CheckpointError
from defocus_scale.train.config import load_train_config
from defocus_scale.train.export import export_checkpoint, init_from, load_exported
from defocus_scale.train.parallel import build_sharded_model, init_distributed

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
TINY = {k.split("=")[0].removeprefix("model.overrides."): int(k.split("=")[1]) for k in TINY_MODEL}


@pytest.fixture(scope="module")
def env():
    """A process group of one in this process (what ``defocus-scale eval`` without a launcher uses)."""
    import torch.distributed as dist

    group = init_distributed("cpu")
    yield group
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from defocus_scale.data.make_shards import make_shards

    root = tmp_path_factory.mktemp("eval-data")
    for name, samples, classes, seed in (("train", 256, 10, 0), ("val", 64, 10, 1), ("val7", 40, CLASSES, 2)):
        make_shards(
            "synthetic",
            root / name,
            synthetic_samples=samples,
            synthetic_classes=classes,
            synthetic_image_size=32,
            samples_per_shard=32,
            seed=seed,
            progress=False,
        )
    return root


@pytest.fixture(scope="module")
def run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 2-rank training run of a tiny De-focus Mamba with EMA, evaluated by the trainer at its end."""
    run_dir = tmp_path_factory.mktemp("run")
    overrides = {
        "data.source": shards / "train",
        "data.eval_source": shards / "val",
        "data.batch_size": 8,
        "data.workers": 0,
        "trainer.run_dir": run_dir,
        "trainer.max_steps": 6,
        "trainer.checkpoint_every": 6,
        "trainer.eval_every": 0,
        "trainer.max_eval_batches": "null",
        "trainer.tensorboard": False,
        "trainer.progress": False,
        "trainer.ema_decay": 0.5,
        "optim.lr": 0.05,
        "schedule.warmup_steps": 1,
    }
    summary = torchrun(2, [f"{k}={v}" for k, v in overrides.items()] + ["~synthetic_data", *TINY_MODEL])
    return run_dir, summary


def _request(model: Path | str, data: Path | str, **kwargs) -> EvalRequest:
    return EvalRequest(model=str(model), data=str(data), workers=0, batch_size=16, **kwargs)


def test_run_directory_live_and_ema_match_the_trainers_evaluation(run, shards, env, tmp_path):
    run_dir, summary = run
    for ema, prefix in ((False, "eval"), (True, "eval_ema")):
        out = tmp_path / f"{prefix}.json"
        result = run_eval(_request(run_dir, shards / "val", ema=ema, out=str(out)), env)
        assert result["kind"] == "run" and result["weights"] == ("ema" if ema else "live")
        assert result["images"] == summary[f"{prefix}/images"] == 64
        assert result["top1"] == summary[f"{prefix}/top1"] and result["top5"] == summary[f"{prefix}/top5"]
        assert result["loss"] == pytest.approx(summary[f"{prefix}/loss"], rel=1e-5)
        written = json.loads(out.read_text())
        assert written["top1"] == result["top1"] and sum(c["images"] for c in written["per_class"]) == 64
        weighted = sum(c["top1"] * c["images"] for c in written["per_class"]) / 64
        assert weighted == pytest.approx(result["top1"])
        assert written["transform"]["image_size"] == 32 and written["transform"]["eval_crop_pct"] == 1.0
    step_folder = next((run_dir / "checkpoints").iterdir())  # a checkpoint folder works as well as the run
    assert run_eval(_request(step_folder, shards / "val"), env)["top1"] == summary["eval/top1"]


def test_exported_file_scores_as_its_run(run, shards, env, tmp_path):
    run_dir, summary = run
    out = tmp_path / "ema.safetensors"
    export_checkpoint(str(run_dir), out, ema=True)
    result = run_eval(_request(out, shards / "val"), env)
    assert result["kind"] == "export" and result["weights"] == "ema"
    assert result["top1"] == summary["eval_ema/top1"]
    assert result["loss"] == pytest.approx(summary["eval_ema/loss"], rel=1e-5)
    assert result["transform"]["eval_crop_pct"] == 1.0  # the run's evaluation settings travel in the export
    export_checkpoint(str(run_dir), tmp_path / "live.safetensors")
    with pytest.raises(CheckpointError, match="holds the live weights only; export with --ema"):
        run_eval(_request(tmp_path / "live.safetensors", shards / "val", ema=True), env)


def _score_by_hand(model: torch.nn.Module, data: Path, num_classes: int, class_map=None) -> dict:
    cfg = DataConfig(
        source=str(data),
        eval_source=str(data),
        num_classes=num_classes,
        image_size=32,
        batch_size=16,
        workers=0,
        eval_crop_pct=0.875,
    )
    logits, labels = [], []
    with torch.no_grad():
        for images, targets in build_eval_loader(cfg, rank=0, world_size=1):
            out = model(images)
            logits.append(out[:, class_map] if class_map is not None else out)
            labels.append(targets)
    logits, labels = torch.cat(logits).float(), torch.cat(labels)
    top5 = logits.topk(5, dim=-1).indices
    return {
        "top1": (top5[:, 0] == labels).double().mean().item(),
        "top5": (top5 == labels[:, None]).any(-1).double().mean().item(),
        "loss": torch.nn.functional.cross_entropy(logits, labels).item(),
        "images": len(labels),
    }


def test_released_checkpoint(shards, env, tmp_path):
    """A file as the release's training script saves it (spec parameter names, random weights, yacs config):
    scored with the release's evaluation (224/256 center crop, bicubic) as an independent loop computes it."""
    sd, ema = published_state_dict(), published_state_dict(seed=5)
    path = tmp_path / "defocus_mamba_cls.pth"
    save_release_checkpoint(path, sd, ema, group=16, img_size=32)
    for use_ema in (False, True):
        result = run_eval(_request(path, shards / "val7", ema=use_ema), env)
        assert result["kind"] == "release" and result["images"] == 40
        assert (
            result["transform"]["eval_crop_pct"] == 0.875
            and result["transform"]["interpolation"] == "bicubic"
        )
        expected = _score_by_hand(load_official_checkpoint(path, use_ema=use_ema), shards / "val7", CLASSES)
        for key in ("top1", "top5", "images"):
            assert result[key] == pytest.approx(expected[key]), key
        assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_22k_head_with_the_releases_class_map(shards, env, tmp_path):
    """A model with more classes than the evaluation set is scored through the release's index file, as its
    validate() does (``output[:, map]``); the same as the head rows picked by its convert_22k_to_1k.py."""
    big = published_state_dict(mlp_heads=True)
    generator = torch.Generator().manual_seed(7)
    for key in ("head.2.weight", "head.2.bias", "head2.2.weight", "head2.2.bias"):  # 12 "21k" classes
        big[key] = torch.randn(12, *big[key].shape[1:], generator=generator) * 0.2
    class_map = [11, 3, 0, 7, 5, 9, 2]
    (tmp_path / "map.txt").write_text("".join(f"{i}\n" for i in class_map))
    torch.save({"model": big}, tmp_path / "22k.pth")
    small = {k: (v[class_map] if k.startswith(("head.2.", "head2.2.")) else v) for k, v in big.items()}
    torch.save({"model": small}, tmp_path / "1k.pth")
    settings = {"release": {"group_size": 16, "img_size": 32}}
    mapped = run_eval(
        _request(tmp_path / "22k.pth", shards / "val7", class_map=str(tmp_path / "map.txt"), **settings), env
    )
    converted = run_eval(_request(tmp_path / "1k.pth", shards / "val7", **settings), env)
    for key in ("top1", "top5", "images"):
        assert mapped[key] == converted[key]
    assert mapped["loss"] == pytest.approx(converted["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="predicts 12 classes, the evaluation set has 7"):
        run_eval(_request(tmp_path / "22k.pth", shards / "val7", **settings), env)


def _image_folder_and_parquet(root: Path, classes: int, per_class: int) -> tuple[Path, Path]:
    folder, rows = root / "folder", {"image": [], "label": []}
    generator = torch.Generator().manual_seed(3)
    for label in range(classes):
        (folder / f"class_{label:02d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            (folder / f"class_{label:02d}" / f"{i}.png").write_bytes(buffer.getvalue())
            rows["image"].append({"bytes": buffer.getvalue(), "path": f"{label}-{i}.png"})
            rows["label"].append(label)
    parquet = root / "parquet" / "validation-00000-of-00001.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.table(rows), parquet)
    return folder, parquet


def test_imagefolder_and_parquet_sources(run, env, tmp_path):
    out = tmp_path / "live.safetensors"
    export_checkpoint(str(run[0]), out)
    folder, parquet = _image_folder_and_parquet(tmp_path, classes=10, per_class=3)
    results = [
        run_eval(_request(out, source, cache_dir=str(tmp_path / "cache")), env)
        for source in (folder, parquet.parent, parquet)
    ]
    for result in results:
        assert result["images"] == 30 and Path(result["shards"]).parent == tmp_path / "cache"
    assert results[0]["per_class"][0]["name"] == "class_00"
    assert results[0]["top1"] == results[1]["top1"] == results[2]["top1"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)


def test_two_ranks_through_the_torchrun_launcher(run, shards, env, tmp_path):
    run_dir, summary = run
    out = tmp_path / "two.json"
    command = [
        sys.executable,
        "-m",
        "defocus_scale.cli",
        "eval",
        str(run_dir),
        str(shards / "val"),
        "--ema",
        "--workers",
        "0",
        "--batch-size",
        "16",
        "--launcher",
        "torchrun",
        "--num-workers",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["images"] == 64  # every sample once across the ranks
    assert result["top1"] == summary["eval_ema/top1"]
    assert result["loss"] == pytest.approx(summary["eval_ema/loss"], rel=1e-5)
    assert "top-1" in done.stdout and "per-class top-1" in done.stdout


def test_convert_release_to_an_exported_file(tmp_path):
    sd = published_state_dict(mlp_heads=True)
    path = tmp_path / "released.pth"
    save_release_checkpoint(path, sd, group=16, rope_scale=4.0, delta_scale=2.0, img_size=32)
    assert cli_main(["convert", str(path), str(tmp_path / "converted.safetensors")]) == 0
    converted = load_exported(tmp_path / "converted.safetensors")
    reference = load_official_checkpoint(path)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(converted(images), reference(images))
    assert converted.blocks[0].mixer.rope_scale == 4.0
    assert cli_main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors")]) == 1


def test_init_from_a_released_file_a_dcp_run_and_an_export(run, env, tmp_path):
    run_dir, _ = run
    kwargs = {**TINY, "img_size": 32, "num_classes": 10}
    # A released-layout file of the same architecture but another class count: the heads stay fresh.
    released = create_model("defocus_mamba_tiny", **{**kwargs, "num_classes": 21}).state_dict()
    save_release_checkpoint(tmp_path / "released.pth", released, group=TINY["group_size"])
    model = build_sharded_model("defocus_mamba_tiny", kwargs, env, seed=1)
    fresh_head = model.state_dict()["head.weight"].full_tensor().clone()
    skipped = init_from(model, tmp_path / "released.pth")
    assert set(skipped) == {"head.weight", "head.bias", "head2.weight", "head2.bias"}
    state = {k: v.full_tensor() for k, v in model.state_dict().items()}
    for key, value in released.items():
        if key not in skipped:
            torch.testing.assert_close(state[key], value, msg=key)
    torch.testing.assert_close(state["head.weight"], fresh_head)
    # A DCP run directory (its EMA weights) and the EMA export of it give the same start.
    export_checkpoint(str(run_dir), tmp_path / "ema.safetensors", ema=True)
    expected = load_exported(tmp_path / "ema.safetensors").state_dict()
    for source in (run_dir, tmp_path / "ema.safetensors"):
        model = build_sharded_model("defocus_mamba_tiny", kwargs, env, seed=2)
        assert init_from(model, source) == []
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value.full_tensor(), expected[key], msg=f"{source}: {key}")


def test_ft384_recipe_from_the_released_22k_large(shards, tmp_path):
    """The recipe composes with the released file as its start; the trainer runs from a released file whose
    MLP heads have another class count (a CPU-sized stand-in for the 21k Large)."""
    cfg = load_train_config(["+recipe=defocus_mamba_large_ft384_from_release"])
    assert cfg.trainer.init_from.endswith("defocus_mamba_large_cls_21k.pth") and cfg.data.image_size == 384
    assert cfg.model.overrides["rope_scale"] == 4.0 and cfg.model.overrides["delta_scale"] == 2.0
    kwargs = {**TINY, "img_size": 32, "num_classes": 21, "head_mlp_ratio": 3.0}
    released = create_model("defocus_mamba_tiny", **kwargs).state_dict()
    save_release_checkpoint(tmp_path / "22k.pth", released, group=TINY["group_size"])
    overrides = {
        "data.source": shards / "train",
        "data.eval_source": shards / "val",
        "data.batch_size": 8,
        "data.workers": 0,
        "trainer.run_dir": tmp_path / "ft",
        "trainer.max_steps": 2,
        "trainer.checkpoint_every": 2,
        "trainer.eval_every": 0,
        "trainer.max_eval_batches": 1,
        "trainer.tensorboard": False,
        "trainer.progress": False,
        "trainer.init_from": tmp_path / "22k.pth",
        "+model.overrides.head_mlp_ratio": 3.0,
        "optim.lr": 0.0,
        "schedule.warmup_steps": 0,
        "schedule.warmup_lr": 0.0,
        "schedule.final_lr": 0.0,
    }
    summary = torchrun(1, [f"{k}={v}" for k, v in overrides.items()] + ["~synthetic_data", *TINY_MODEL])
    assert summary["final_step"] == 2
    started = load_exported(_export(tmp_path / "ft", tmp_path / "ft.safetensors")).state_dict()
    for key, value in released.items():  # lr 0: the weights are still the released ones (heads: fresh)
        if not key.startswith(("head.2.", "head2.2.")):
            torch.testing.assert_close(started[key], value, msg=key)


def _export(run_dir: Path, out: Path) -> Path:
    export_checkpoint(str(run_dir), out)
    return out
