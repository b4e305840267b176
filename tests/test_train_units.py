"""Trainer pieces without processes: config errors name the key, batch planning, parameter groups, the
checkpoint store's completeness checks and pruning, the sharded EMA, lockstep epochs, metrics, FLOPs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch

from defocus_scale.models import create_model
from defocus_scale.train.checkpoint import COMMIT_MARKER, TRAINER_STATE, CheckpointStore
from defocus_scale.train.config import ConfigError, load_train_config, resolve_batch
from defocus_scale.train.metrics import MetricsWriter, train_flops_per_sample
from defocus_scale.train.optim import clip_grad_norm, param_groups, scaled_lr

TINY = dict(embed_dim=32, depth=2, inner_dim=64, dt_rank=4, group_size=16, img_size=16, patch_size=4,
            num_classes=10)  # fmt: skip


def test_default_config_and_recipes_compose() -> None:
    cfg = load_train_config(["trainer.run_dir=runs/x"])
    assert cfg.data.source == "runs/x/synthetic-data/train" and cfg.synthetic_data is not None
    large = load_train_config(["+recipe=defocus_mamba_large_ft384_in1k"])
    assert large.model.overrides["rope_scale"] == 4.0 and large.model.overrides["delta_scale"] == 2.0
    assert large.data.image_size == 384
    base = load_train_config(["+recipe=defocus_mamba_base_in1k"])
    assert base.schedule.drop_path.end == 0.75 and base.trainer.global_batch == 1024
    assert scaled_lr(base.optim.lr, 1024, base.optim.lr_reference_batch) == pytest.approx(1e-3)
    for recipe in ("defocus_vit_small_in1k", "defocus_retnet_base_in1k", "deit_small_in1k",
                   "defocus_mamba_small_in1k", "defocus_mamba_large_in22k"):  # fmt: skip
        assert load_train_config([f"+recipe={recipe}"]).trainer.max_steps > 0


@pytest.mark.parametrize(
    ("override", "key"),
    [("trainer.max_steps=abc", "trainer.max_steps"), ("trainer.keep_last=0", "trainer.keep_last"),
     ("+trainer.bogus=1", "bogus"), ("data.batch_size=x", "data.batch_size"), ("model=nope", "model/nope")],
)  # fmt: skip
def test_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_train_config([override])


def test_global_batch_fixed_across_world_sizes() -> None:
    cfg = load_train_config(["trainer.global_batch=64", "trainer.max_micro_batch=16"])
    plans = {world: resolve_batch(cfg, world) for world in (1, 2, 4)}
    assert [(p.micro_batch, p.accumulation) for p in plans.values()] == [(16, 4), (16, 2), (16, 1)]
    assert all(p.global_batch == 64 for p in plans.values())
    assert resolve_batch(cfg, 3).global_batch == 63  # the nearest multiple of 3 (lr follows it)
    exact = load_train_config(["trainer.global_batch=64", "trainer.global_batch_rounding=exact"])
    with pytest.raises(ConfigError, match="trainer.global_batch"):
        resolve_batch(exact, 3)
    free = load_train_config(["data.batch_size=8", "trainer.grad_accum_steps=3"])
    assert resolve_batch(free, 2).global_batch == 48


def test_param_groups_exempt_published_parameters() -> None:
    model = create_model("defocus_mamba_tiny", **TINY)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    published = {"blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.0.mixer.freq", "cls_token", "head.bias"}
    assert published <= exempt
    assert all(p.ndim >= 2 for p in decay["params"]) and "blocks.0.mixer.in_proj.weight" not in exempt
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_clip_grad_norm_plain_tensors() -> None:
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad, params[1].grad = torch.full((3,), 2.0), torch.full((4,), 2.0)
    norm = clip_grad_norm(params, 1.0)
    assert norm.item() == pytest.approx(4.0 * 7**0.5 / 2)
    total = torch.cat([p.grad for p in params]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)


def _fake_checkpoint(store: CheckpointStore, step: int, *, commit: bool = True) -> Path:
    """A real (one-process) DCP save of a small tensor, plus the trainer state."""
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = Path(store.path(step))
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"w": torch.zeros(64)}, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    (folder / TRAINER_STATE).write_text(json.dumps({"step": step}))
    if commit:
        store.commit(step)
    return folder


def test_store_skips_partial_and_damaged_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    assert store.newest_complete() == (None, [])
    for step in (10, 20, 30, 40):
        _fake_checkpoint(store, step, commit=step != 40)  # 40: killed before the commit marker
    truncated = Path(store.path(30)) / "__0_0.distcp"
    truncated.write_bytes(b"x" * 50)
    (Path(store.path(20)) / ".metadata").unlink()
    step, skipped = store.newest_complete()
    assert step == 10
    assert [s for s, _ in skipped] == [40, 30, 20]
    reasons = dict(skipped)
    assert "commit marker" in reasons[40] and "50 bytes" in reasons[30] and ".metadata" in reasons[20]
    (Path(store.path(10)) / COMMIT_MARKER).write_text("{not json")
    assert "unreadable" in store.problem(10)


def test_hand_edited_commit_marker_is_checked_against_dcp_metadata(tmp_path: Path) -> None:
    """A tensor file removed from disk and from COMMITTED.json: DCP's .metadata still names it."""
    store = CheckpointStore(str(tmp_path))
    folder = _fake_checkpoint(store, 7)
    assert store.problem(7) is None
    data_file = next(folder.glob("*.distcp"))
    data_file.unlink()
    marker = json.loads((folder / COMMIT_MARKER).read_text())
    del marker["files"][data_file.name]
    (folder / COMMIT_MARKER).write_text(json.dumps(marker))
    assert store.problem(7) == f"file {data_file.name}, which DCP's .metadata names, is missing"


def test_store_prunes_to_keep_last(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    _fake_checkpoint(store, 5, commit=False)  # an old unfinished save: can never complete
    for step in (10, 20, 30):
        _fake_checkpoint(store, step)
    damaged = _fake_checkpoint(store, 25)
    (damaged / "__0_0.distcp").write_bytes(b"")
    _fake_checkpoint(store, 40, commit=False)  # newer than the newest complete one: maybe being written
    removed = store.prune(keep_last=2)
    assert removed == [5, 10] and store.steps() == [20, 25, 30, 40]  # the damaged one is kept for inspection


def test_commit_refuses_without_dcp_metadata(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    folder = _fake_checkpoint(store, 1, commit=False)
    (folder / ".metadata").unlink()
    with pytest.raises(RuntimeError, match=r"\.metadata"):
        store.commit(1)


def test_metrics_tables(tmp_path: Path) -> None:
    writer = MetricsWriter(str(tmp_path), first_step=0, tensorboard=True, console=None, log_every=1)
    for step in range(1, 151):
        writer.log(step, {"loss": 1.0 / step, "drop_path": 0.1})
    writer.log(150, {"top1": 0.5}, table="eval")
    writer.close()
    train = ds.dataset(tmp_path / "metrics" / "train", format="parquet").to_table()
    assert train.column("step").to_pylist() == list(range(1, 151))
    evals = ds.dataset(tmp_path / "metrics" / "eval", format="parquet").to_table()
    assert evals.column("top1").to_pylist() == [0.5]
    assert any((tmp_path / "tensorboard").iterdir())


def test_flop_count_matches_vit_formula() -> None:
    # DeiT-S at 224 px: 4.6 GMACs forward; forward + backward = 3 x forward = 27.6 GFLOP.
    flops = train_flops_per_sample(lambda: create_model("deit_small"), 224)
    assert flops == pytest.approx(3 * 2 * 4.6e9, rel=0.02)


def test_flop_count_of_depthwise_convolution_backward() -> None:
    """A depthwise convolution's backward counts twice its forward (input and weight gradients), not
    ``groups`` times more (torch's formula ignores groups): De-focus Mamba-S is 3 x its forward, as DeiT-S."""
    from torch.utils.flop_counter import FlopCounterMode

    mamba = train_flops_per_sample(lambda: create_model("defocus_mamba_small"), 224)
    with torch.device("meta"), FlopCounterMode(display=False) as forward:
        create_model("defocus_mamba_small").train().forward_train(torch.empty(1, 3, 224, 224))
    assert mamba == pytest.approx(3 * forward.get_total_flops(), rel=0.01)
    assert mamba == pytest.approx(28.66e9, rel=0.01)


def test_ema_update_and_swap() -> None:
    from defocus_scale.train.ema import ShardedEMA

    model = torch.nn.Linear(2, 2)
    ema = ShardedEMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.state_dict()["weight"], start + 0.1)
    live = model.weight.detach().clone()
    with ema.swapped_in():
        torch.testing.assert_close(model.weight.detach(), start + 0.1)
    torch.testing.assert_close(model.weight.detach(), live)


def test_subcommands_parse() -> None:
    import argparse

    from defocus_scale.cli import build_parser

    parser = build_parser()
    train_args = parser.parse_args(["train", "model=defocus_mamba_small", "trainer.max_steps=3"])
    assert train_args.overrides == ["model=defocus_mamba_small", "trainer.max_steps=3"]
    export_args = parser.parse_args(["export", "runs/x", "out.safetensors", "--ema"])
    assert (export_args.checkpoint, export_args.out, export_args.ema) == ("runs/x", "out.safetensors", True)
    missing = argparse.Namespace(checkpoint="/nonexistent/run", out="x.safetensors", ema=False)
    assert export_args.func(missing) == 1  # a clear message, no traceback


def test_entry_config_replaces_the_default_model() -> None:
    """A launcher's model section must not inherit the default model's keyword arguments."""
    from omegaconf import OmegaConf

    from defocus_scale.train import split_orchestration, to_train_config
    from defocus_scale.train.config import compose_train_config

    base = split_orchestration(compose_train_config())[1]
    assert "inner_dim" in base["model"]["overrides"]  # the default (Mamba) model's own kwargs
    cfg = {"model": {"name": "defocus_vit_tiny", "overrides": {"depth": 2}}}
    base.pop("model")
    merged = to_train_config(OmegaConf.merge(base, cfg))
    assert merged.model.overrides == {"depth": 2}


@pytest.mark.parametrize("mode", ["init", "after-first-step"])
def test_collectives_time_out_as_configured(tmp_path: Path, mode: str) -> None:
    """``trainer.collective_timeout_s`` reaches the process group, and the shorter
    ``step_collective_timeout_s`` replaces it after the first step: a peer that never joins fails the
    collective in seconds."""
    import subprocess
    import sys

    from defocus_scale.train.config import collective_timeout_s

    assert collective_timeout_s({}) == 600.0
    assert collective_timeout_s({"trainer": {"collective_timeout_s": 30}}) == 30.0
    script = Path(__file__).parent / "dist_scripts" / "collective_timeout.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         mode], capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    line = next((x for x in done.stdout.splitlines() if "TIMED OUT" in x), None)
    assert line is not None, done.stdout + done.stderr[-3000:]
    assert float(line.split()[3]) < 15, line


class _PlannedLoader:
    """A loader that promises ``planned`` batches per epoch but yields ``delivered`` (decode failures)."""

    def __init__(self, planned: int | None, delivered: int) -> None:
        self.planned, self.delivered, self.epoch, self.given = planned, delivered, 0, 0

    def batches_remaining(self) -> int | None:
        return self.planned

    def batches_with_keys(self):
        for i in range(self.delivered):
            self.given += 1
            yield torch.full((1, 3, 2, 2), float(i)), torch.tensor([i]), [f"e{self.epoch}-{i}"]

    def __iter__(self):
        return ((x, y) for x, y, _ in self.batches_with_keys())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


@pytest.mark.parametrize(("planned", "delivered"), [(3, 3), (3, 2), (None, 2)])
def test_lockstep_batches_follow_the_agreed_plan(planned: int | None, delivered: int) -> None:
    """Planned epochs take exactly the plan; a rank that runs short gets zero-weight stand-ins (its last
    batch, no keys); without a plan the epoch ends when a rank has no batch."""
    import torch.distributed as dist

    from defocus_scale.train.batches import LockstepBatches
    from defocus_scale.train.parallel import init_distributed

    init_distributed("cpu")
    try:
        loader = _PlannedLoader(planned, delivered)
        batches = LockstepBatches(loader, 0, torch.device("cpu"), audit=True)
        epoch_length = planned if planned is not None else delivered
        got = [batches.next() for _ in range(epoch_length + 1)]
        short = epoch_length - delivered
        assert [b.weight for b in got[:epoch_length]] == [1.0] * delivered + [0.0] * short
        assert batches.stand_ins == epoch_length - delivered and batches.epoch == 1
        assert got[-1].keys == ["e1-0"] and got[-1].weight == 1.0  # the next epoch's first batch
        if epoch_length > delivered:
            assert got[delivered].keys == [] and torch.equal(got[delivered].images, got[delivered - 1].images)
        assert batches.consumed == [f"e0-{i}" for i in range(delivered)] + ["e1-0"]
        assert batches.planned_epochs == (2 if planned is not None else 0)
        batches.close()
    finally:
        dist.destroy_process_group()


def test_flight_recorder_dumps_beside_the_run_or_in_the_node_temp_dir(tmp_path: Path) -> None:
    import tempfile

    from defocus_scale.train.parallel import flight_recorder_env

    local = flight_recorder_env(str(tmp_path / "run"))
    assert local["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "run" / "flight_recorder" / "rank_")
    assert local["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(local["TORCH_FR_BUFFER_SIZE"]) > 0
    remote = flight_recorder_env("s3://bucket/runs/mamba-b")["TORCH_FR_DUMP_TEMP_FILE"]
    assert remote == str(Path(tempfile.gettempdir()) / "defocus-flight-recorder" / "mamba-b" / "rank_")


def test_openmp_threads_spin_briefly_in_our_processes(tmp_path) -> None:
    """Importing defocus_scale (before torch) caps OpenMP's spin unless the user chose a wait policy;
    the launchers pass the setting on to their workers."""
    import os
    import subprocess
    import sys

    from defocus_scale.train.parallel import worker_env

    probe = "import defocus_scale, os, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10000"
    for chosen in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        out = subprocess.run([sys.executable, "-c", probe], env={**env, **chosen}, capture_output=True,
                             text=True, check=True)  # fmt: skip
        assert out.stdout.strip() == chosen.get("GOMP_SPINCOUNT", "None")
    assert worker_env(str(tmp_path)).get("GOMP_SPINCOUNT") == os.environ.get("GOMP_SPINCOUNT")
