"""The training loop: one optimizer step = ``grad_accum_steps`` micro-batches in lockstep on every rank,
then sharded clipping, AdamW, EMA; checkpoints, evaluation and metrics around it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.distributed.tensor import DTensor

from defocus_scale.data.config import DataConfig
from defocus_scale.losses import defocus_loss
from defocus_scale.models import create_model
from defocus_scale.schedules import DropPathSchedule
from defocus_scale.train.bad_data import BadData, check_bad_data, gather_bad_data
from defocus_scale.train.batches import LockstepBatches, TrainLoaderLike, close_iterator, reduce_int
from defocus_scale.train.checkpoint import (
    CHECKPOINT_FOLDER,
    Checkpointer,
    CheckpointStore,
    TrainState,
    rng_state,
    set_rng_state,
    step_folder,
)
from defocus_scale.train.config import ConfigError, TrainConfig, config_to_dict, resolve_batch
from defocus_scale.train.data_index import indexed_source
from defocus_scale.train.ema import ShardedEMA
from defocus_scale.train.export import init_from
from defocus_scale.train.metrics import (
    MetricsWriter,
    peak_flops_per_device,
    peak_memory_bytes,
    train_flops_per_sample,
)
from defocus_scale.train.nonfinite import NonFiniteGuard, NonFiniteTrainingError, all_finite, gather_keys
from defocus_scale.train.optim import build_optimizer, clip_grad_norm, lr_schedule, scaled_lr, set_lr
from defocus_scale.train.parallel import (
    DistEnv,
    all_reduce_replicated_grads,
    build_sharded_model,
    init_distributed,
    mixed_precision_policy,
    replicated_parameters,
    set_collective_timeout,
)
from defocus_scale.train.preflight import check_shared_storage
from defocus_scale.train.step_log import DeferredSteps

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


TrainLoaderFactory = Callable[..., TrainLoaderLike]  # (cfg, *, rank, world_size, seed, epoch, device)
EvalLoaderFactory = Callable[..., Any]  # (cfg, *, rank, world_size, device) -> (images, labels)...


class TrainingHooks(Protocol):
    """Callbacks for a launcher (the orchestration's fault injection and restart records). They run on
    the host after each step's work is queued: the step's figures are not known yet (see step_log)."""

    def on_resume(self, step: int, checkpoint: str | None) -> None: ...
    def on_step_end(self, step: int) -> None: ...


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, env: DistEnv, image_size: int, max_batches: int | None = None
) -> dict[str, float]:
    """Top-1/top-5 and CE of the last token's logits over the validation set, summed across ranks. Ranks
    that run out of batches first keep joining FSDP's collectives on a dummy batch."""
    was_training = model.training
    model.eval()
    batches = iter(loader)
    try:
        return _evaluate_batches(model, batches, env, image_size, max_batches)
    finally:
        close_iterator(batches)  # a short max_batches or an error leaves the loader's workers running
        model.train(was_training)


def _evaluate_batches(
    model: nn.Module, batches: Iterator[Any], env: DistEnv, image_size: int, max_batches: int | None
) -> dict[str, float]:
    totals = torch.zeros(4, dtype=torch.float64, device=env.device)  # correct@1, correct@5, loss, count
    seen, full = 0, None
    while True:
        batch = next(batches, None) if max_batches is None or seen < max_batches else None
        seen += 1
        if not reduce_int(int(batch is not None), dist.ReduceOp.MAX, env.device):
            break
        # Every forward sees one batch shape (the first batch's; the last, short one and the dummy of a
        # rank that ran out are padded), so compiled blocks are not recompiled for eval leftovers.
        images = batch[0] if batch is not None else torch.zeros(0, 3, image_size, image_size)
        full = full or max(images.shape[0], 1)
        count = images.shape[0]
        if count < full:
            images = torch.cat([images, images.new_zeros(full - count, *images.shape[1:])])
        logits = model(images.to(env.device, non_blocking=True)).float()[:count]
        if batch is None:
            continue
        labels = batch[1].to(env.device)
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        totals[0] += (top5[:, 0] == labels).sum()
        totals[1] += (top5 == labels[:, None]).any(dim=-1).sum()
        totals[2] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        totals[3] += labels.numel()
    dist.all_reduce(totals)
    count = max(totals[3].item(), 1.0)
    return {"top1": totals[0].item() / count, "top5": totals[1].item() / count,
            "loss": totals[2].item() / count, "images": totals[3].item()}  # fmt: skip


def _gather_objects(obj: Any, world_size: int) -> list[Any]:
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def _default_train_loader(cfg: DataConfig, **kwargs: Any) -> TrainLoaderLike:
    from defocus_scale.data.loader import build_train_loader

    return build_train_loader(cfg, **kwargs)


def _default_eval_loader(cfg: DataConfig, **kwargs: Any) -> Any:
    from defocus_scale.data.loader import build_eval_loader

    return build_eval_loader(cfg, **kwargs)


def prepare_synthetic_data(cfg: TrainConfig, env: DistEnv) -> None:
    """With ``synthetic_data`` set, rank 0 writes the synthetic shards ``data`` points at, if missing."""
    if cfg.synthetic_data is None:
        return
    if env.is_main:
        from pathlib import Path

        from defocus_scale.data.make_shards import make_shards

        spec = cfg.synthetic_data
        targets = [(cfg.data.source, spec.train_samples, 0)]
        if cfg.data.eval_source:
            targets.append((cfg.data.eval_source, spec.eval_samples, 1))
        for out_dir, samples, seed in targets:
            if not (Path(out_dir) / "manifest.parquet").exists():
                make_shards(
                    "synthetic", out_dir, synthetic_samples=samples, synthetic_classes=cfg.data.num_classes,
                    synthetic_image_size=cfg.data.image_size, samples_per_shard=spec.samples_per_shard,
                    seed=seed, progress=False,
                )  # fmt: skip
    dist.barrier()


def train(
    cfg: TrainConfig,
    *,
    hooks: TrainingHooks | None = None,
    env: DistEnv | None = None,
    train_loader_factory: TrainLoaderFactory = _default_train_loader,
    eval_loader_factory: EvalLoaderFactory | None = _default_eval_loader,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` in the current process group (created if absent); returns rank 0's summary (every rank
    returns the same keys)."""
    trainer = cfg.trainer
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    try:
        env = env or init_distributed(
            trainer.device, timeout_s=trainer.collective_timeout_s, replicate=trainer.dp_replicate,
            flight_recorder_dir=trainer.run_dir,
        )  # fmt: skip
    except ValueError as exc:  # a mesh or backend the world cannot have: the user's to fix
        raise ConfigError(str(exc)) from None
    console = console or Console()
    plan = resolve_batch(cfg, env.world_size)
    data_cfg = dataclasses.replace(cfg.data, batch_size=plan.micro_batch)
    prepare_synthetic_data(cfg, env)
    sources = {"data.source": cfg.data.source, "data.eval_source": cfg.data.eval_source}
    check_shared_storage(trainer.run_dir, sources, rank=env.rank)
    # Shards without a manifest are indexed once by all ranks, so that the stream splits them by sample.
    indexed = {key: indexed_source(source, trainer.run_dir, rank=env.rank, world_size=env.world_size,
                                   max_bad_fraction=cfg.data.max_bad_fraction)
               for key, source in (("source", cfg.data.source), ("eval_source", cfg.data.eval_source))
               if source is not None}  # fmt: skip
    data_cfg = dataclasses.replace(data_cfg, **indexed)

    model_kwargs = {
        "img_size": cfg.data.image_size,
        "num_classes": cfg.data.num_classes,
        **cfg.model.overrides,
    }
    model = build_sharded_model(
        cfg.model.name, model_kwargs, env, precision=trainer.precision,
        activation_checkpointing=trainer.activation_checkpointing, compile=trainer.compile, seed=trainer.seed,
        reshard_after_forward=trainer.reshard_after_forward,
    )  # fmt: skip
    lr_peak = scaled_lr(cfg.optim.lr, plan.global_batch, cfg.optim.lr_reference_batch)
    optimizer = build_optimizer(
        model, lr=lr_peak, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas, eps=cfg.optim.eps
    )
    lr_at = lr_schedule(
        lr_peak, warmup_steps=cfg.schedule.warmup_steps, total_steps=trainer.max_steps,
        warmup_lr=cfg.schedule.warmup_lr, final_lr=cfg.schedule.final_lr,
    )  # fmt: skip
    drop_path = DropPathSchedule(**dataclasses.asdict(cfg.schedule.drop_path))
    ema = ShardedEMA(model, trainer.ema_decay) if trainer.ema_decay > 0 else None
    state = TrainState(model, optimizer, ema)
    store = CheckpointStore(trainer.run_dir)
    checkpointer = Checkpointer(
        store, keep_last=trainer.keep_last, async_save=trainer.async_save, rank=env.rank,
        cuda=env.device.type == "cuda",
    )  # fmt: skip

    # Every exit -- an error, SIGTERM raised as Terminated -- closes what the run opened: the loader's
    # workers, the metrics files, and the checkpointer, which abandons (never commits half of) a pending save.
    with contextlib.ExitStack() as cleanup:
        cleanup.push(lambda failed, *_: checkpointer.close(abandon=failed is not None))
        step, epoch, saved, resumed_from, loader_states = _resume_or_start(cfg, checkpointer, state, env,
                                                                           console)  # fmt: skip
        # Keys of the samples consumed in this run so far (trainer.audit_samples): carried by checkpoints.
        audit_log: list[str] = list(saved.get("consumed_keys", [])) if saved else []
        if resumed_from is None and trainer.init_from:
            skipped = init_from(model, trainer.init_from)
            if env.is_main:
                console.print(f"initialised from {trainer.init_from}; kept fresh: {skipped or 'nothing'}")
            if ema is not None:
                ema = state.ema = ShardedEMA(model, trainer.ema_decay)
        train_loader = train_loader_factory(
            data_cfg, rank=env.rank, world_size=env.world_size, seed=trainer.seed, epoch=epoch,
            device=env.device,
        )  # fmt: skip  (batches arrive normalised, and mixed, on env.device: the workers ship uint8)
        if loader_states is not None:
            train_loader.load_state_dict(loader_states)
        if hooks is not None:
            hooks.on_resume(step, resumed_from)
        # MFU bookkeeping: FLOPs of one training sample on a meta copy, the stated per-device peak.
        flops_per_sample = train_flops_per_sample(
            lambda: create_model(cfg.model.name, **model_kwargs), cfg.data.image_size
        )
        bf16 = mixed_precision_policy(trainer.precision, env.device).param_dtype == torch.bfloat16
        peak = trainer.peak_flops or peak_flops_per_device(env.device, bf16)[0]
        peak_note = "trainer.peak_flops" if trainer.peak_flops else peak_flops_per_device(env.device, bf16)[1]
        metrics = None
        if env.is_main:
            metrics = MetricsWriter(
                trainer.run_dir,
                first_step=step,
                tensorboard=trainer.tensorboard,
                console=console,
                log_every=trainer.log_every,
            )
            cleanup.callback(metrics.close)
            n_params = sum(p.numel() for p in model.parameters())
            console.print(
                f"[bold]{cfg.model.name}[/] {n_params / 1e6:.2f}M parameters on "
                f"{env.world_size} x {env.device.type}; "
                f"global batch {plan.global_batch} = {env.world_size} ranks x {plan.micro_batch} x "
                f"{plan.accumulation} accumulation; lr {lr_peak:.3g}; MFU peak: {peak_note}"
            )
            if plan.rounded:
                console.print(
                    f"[yellow]trainer.global_batch={plan.requested} does not split over {env.world_size} "
                    f"ranks: the nearest multiple, {plan.global_batch}, is used and the lr follows it[/]"
                )

        batches = LockstepBatches(train_loader, epoch, env.device, audit=trainer.audit_samples)
        cleanup.callback(batches.close)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        replicated = replicated_parameters(model)  # the fp32 part of a bf16 run: averaged by hand
        label_smoothing = cfg.data.label_smoothing
        guard = NonFiniteGuard(trainer.max_nonfinite_steps, trainer.run_dir, env.is_main)
        skip_steps, inject_nonfinite = set(trainer.skip_steps), set(trainer.inject_nonfinite_at)
        first_step, losses, blocked_by_save = step, [], 0.0
        deferred = DeferredSteps()
        progress = _progress(console, trainer.max_steps, step, enabled=env.is_main and trainer.progress)
        task = progress.add_task("train", total=trainer.max_steps, completed=step, status="")
        bad_data: BadData | None = None  # the last bad-data figures of all ranks (this epoch so far)

        def read_back_steps() -> None:
            """The one host sync of a logging window: the deferred steps' figures, their metrics rows, the
            non-finite guard (which may stop the run here, up to ``log_every`` steps after the streak), and
            the bad data of all ranks, held to data.max_bad_fraction (which may stop every rank here)."""
            nonlocal bad_data
            rows, previous = deferred.read(), bad_data
            if rows or bad_data is None:  # a collective: every rank has the same rows
                bad_data = gather_bad_data(train_loader, env.world_size, env.device)
            data_now = bad_data.metrics()  # on the window's last row; the rows before keep the last figures
            data_before = data_now if previous is None else previous.metrics()
            for row in rows:
                nonfinite_keys = [] if row.finite else gather_keys(row.keys, env.world_size)
                guard.observe(row.step, row.finite, nonfinite_keys, checkpointer.last_committed)
                figures = row.figures
                losses.append(figures["loss"])
                images_per_s = plan.global_batch / row.seconds
                if metrics is not None:
                    metrics.log(row.step, {
                        **{k: v for k, v in figures.items() if k != "finite"}, **row.host,
                        "images_per_s": images_per_s,
                        "mfu": images_per_s * flops_per_sample / (peak * env.world_size),
                        "step_seconds": row.seconds, "step_skipped": 0.0 if row.finite else 1.0,
                        "nonfinite_steps": float(guard.total),
                        **(data_now if row is rows[-1] else data_before),
                    })  # fmt: skip
                status = f"loss {figures['loss']:.3f} lr {row.host['lr']:.2e} dp {row.host['drop_path']:.3f}"
                progress.update(task, completed=row.step, status=status)
            check_bad_data(bad_data, cfg.data.max_bad_fraction, step=step, epoch=batches.epoch,
                           world_size=env.world_size)  # fmt: skip

        def check_finished_epoch(finished: int) -> None:
            """Bad data of the epoch's last window, which the next read-back (in a new epoch) cannot see."""
            figures = gather_bad_data(train_loader, env.world_size, env.device)
            check_bad_data(figures, cfg.data.max_bad_fraction, step=step, epoch=finished,
                           world_size=env.world_size)  # fmt: skip
            if figures.reporting and env.is_main and (figures.bad_shards or figures.bad_samples):
                console.print(f"epoch {finished}: {len(figures.bad_shards)} bad shards, "
                              f"{figures.bad_samples} undecodable samples over all ranks")  # fmt: skip

        batches.on_epoch_end = check_finished_epoch

        with progress:
            last_step = min(trainer.max_steps, trainer.stop_at_step or trainer.max_steps)
            while step < last_step:
                lr, rate = lr_at(step), drop_path.rate(step, trainer.max_steps)
                if step + 1 in skip_steps:  # trainer.skip_steps: draw this step's batches and drop them
                    for _micro in range(plan.accumulation):
                        batches.next()
                    step += 1
                    if metrics is not None:
                        metrics.log(step, {"skipped_by_config": 1.0, "epoch": batches.epoch}, table="skipped")
                    continue
                set_lr(optimizer, lr)
                sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # total, main, aux
                step_keys: list[str] = []
                for micro in range(plan.accumulation):
                    batch = batches.next()
                    step_keys += batch.keys
                    images = batch.images.to(env.device, non_blocking=True)
                    targets = batch.targets.to(env.device, non_blocking=True)
                    if trainer.defer_gradient_sync:  # unsharded gradients kept until the last micro-batch
                        model.set_requires_gradient_sync(micro == plan.accumulation - 1)
                    smoothing = label_smoothing if targets.ndim == 1 else 0.0  # mixed targets: soft already
                    parts = defocus_loss(model.forward_train(images, rate), targets, smoothing)
                    total = parts.total
                    if step + 1 in inject_nonfinite:  # trainer.inject_nonfinite_at: a fault drill
                        total = total * float("nan")
                    (total * (batch.weight / plan.accumulation)).backward()
                    aux = parts.aux if parts.aux is not None else torch.full_like(parts.main, float("nan"))
                    step_parts = torch.stack([total.detach(), parts.main.detach(), aux.detach()]).double()
                    sums += step_parts * batch.weight
                all_reduce_replicated_grads(replicated, env.world_size)
                # All-reduced: one decision on every rank, taken on the device (no host sync): a non-finite
                # loss or gradient norm makes the fused AdamW step and the EMA update no-ops.
                grad_norm = clip_grad_norm(params, cfg.optim.grad_clip)
                mean_losses = sums / (plan.accumulation * env.world_size)
                dist.all_reduce(mean_losses)
                finite = torch.isfinite(mean_losses[0]) & torch.isfinite(grad_norm)
                blocked_by_save += checkpointer.wait_for_staging()  # the last save's copy must be complete
                optimizer.found_inf = (~finite).float()
                optimizer.step()
                if ema is not None:
                    ema.update(gate=finite)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step == first_step + 1 and trainer.step_collective_timeout_s:
                    set_collective_timeout(env.mesh, trainer.step_collective_timeout_s)
                figures = torch.cat([mean_losses, grad_norm.double().reshape(1), finite.double().reshape(1)])
                host = {"lr": lr, "drop_path": rate, "epoch": float(batches.epoch),
                        "peak_memory_gib": peak_memory_bytes(env.device) / 2**30}  # fmt: skip
                deferred.add(step, figures, host, step_keys)
                if hooks is not None:
                    hooks.on_step_end(step)
                checkpointer.poll()
                saving = bool(trainer.checkpoint_every) and (
                    step % trainer.checkpoint_every == 0 or step == last_step
                )
                evaluating = bool(trainer.eval_every) and step % trainer.eval_every == 0 and step < last_step
                if step % trainer.log_every == 0 or saving or evaluating or step == last_step:
                    read_back_steps()
                if saving:
                    _refuse_nonfinite_state(state, env, step)
                    trainer_state = {
                        "step": step, "epoch": batches.epoch, "global_batch": plan.global_batch,
                        "config": config_to_dict(cfg), "nonfinite_steps": guard.total,
                    }  # fmt: skip  (the run id and world size are the checkpointer's to add)
                    own_state = {"loader": train_loader.state_dict(), "rng": rng_state()}
                    if trainer.audit_samples:  # every rank's keys since the last save, in rank order
                        gathered = _gather_objects(batches.consumed, env.world_size)
                        audit_log += [key for keys in gathered for key in keys]
                        batches.consumed = []
                        trainer_state["consumed_keys"] = audit_log
                    blocked_by_save += checkpointer.save(step, state, trainer_state, own_state)
                    if metrics is not None:  # the metrics up to a checkpoint are as durable as it is
                        metrics.flush()
                if evaluating:
                    blocked_by_save += checkpointer.wait_for_staging()  # the EMA swap writes the parameters
                    _run_eval(cfg, data_cfg, model, ema, env, metrics, step, eval_loader_factory)
                if saving or evaluating:
                    deferred.restart_clock()
            read_back_steps()
        checkpointer.close()
        final_eval = _run_eval(cfg, data_cfg, model, ema, env, metrics, step, eval_loader_factory)
        peak_mem = torch.tensor([peak_memory_bytes(env.device)], dtype=torch.float64, device=env.device)
        peaks = [torch.zeros_like(peak_mem) for _ in range(env.world_size)]
        dist.all_gather(peaks, peak_mem)
        if metrics is not None:
            metrics.close()
        head = max(1, min(5, len(losses) // 4))
        return {
            "final_step": step, "epoch": batches.epoch, "resumed_from": resumed_from,
            "run_id": checkpointer.run_id,
            "steps_run": step - first_step,
            "loss_first": sum(losses[:head]) / head if losses else None,
            "loss_last": sum(losses[-head:]) / head if losses else None,
            "global_batch": plan.global_batch, "micro_batch": plan.micro_batch,
            "accumulation": plan.accumulation,
            "lr_peak": lr_peak, "flops_per_sample": flops_per_sample, "peak_flops_per_device": peak,
            "peak_flops_source": peak_note, "seconds_blocked_by_checkpoints": blocked_by_save,
            "peak_memory_bytes_per_rank": [int(p.item()) for p in peaks], "nonfinite_steps": guard.total,
            "stand_in_batches": batches.stand_ins, "planned_epochs": batches.planned_epochs,
            **(bad_data or BadData()).summary(),
            "mesh": dict(zip(env.mesh.mesh_dim_names or (), env.mesh.shape)),
            "placements": _placements(model),
            **compile_counters(trainer.compile), **final_eval,
        }  # fmt: skip


def _placements(model: nn.Module) -> str:
    """How the first block's first weight is laid out over the mesh (e.g. HSDP: Replicate, Shard(0))."""
    weight = next((p for p in model.parameters() if isinstance(p, DTensor)), None)
    return "" if weight is None else ", ".join(str(p) for p in weight.placements)


def _refuse_nonfinite_state(state: TrainState, env: DistEnv, step: int) -> None:
    """A checkpoint must never hold NaN/inf weights, optimizer moments or EMA: it would become the resume
    point. Skipped steps keep the state finite, so this firing means a finite gradient overflowed it."""
    tensors = [p for p in state.model.parameters()]
    for per_param in state.optimizer.state.values():
        tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
    if state.ema is not None:
        tensors += list(state.ema.state_dict().values())
    if not all_finite(tensors, env.device):
        raise NonFiniteTrainingError(
            f"step {step}: the weights, optimizer state or EMA hold NaN/inf values; not saving a checkpoint "
            "of them (the newest complete checkpoint is kept as the resume point)"
        )


def compile_counters(enabled: bool) -> dict[str, Any]:
    """Dynamo's counts for this process (trainer.compile): graphs, graph breaks and recompilations."""
    if not enabled:
        return {}
    from torch._dynamo.utils import counters

    return {
        "compile/unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "compile/graph_breaks": int(sum(counters["graph_break"].values())),
        "compile/frames_ok": int(counters["frames"].get("ok", 0)),
        "compile/frames_total": int(counters["frames"].get("total", 0)),
        "compile/recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
        "compile/graph_break_reasons": sorted(counters["graph_break"])[:10],
    }


def _resume_or_start(
    cfg: TrainConfig, checkpointer: Checkpointer, state: TrainState, env: DistEnv, console: Console
) -> tuple[int, int, dict[str, Any] | None, str | None, list[dict] | None]:
    """Load the newest complete checkpoint if resuming; returns (step, epoch, its trainer state, checkpoint
    folder relative to the run, the loader states this rank restores from: its own, or every old rank's
    after a change of world size) -- (0, 0, None, None, None) on a fresh start."""
    seed = cfg.trainer.seed * 1_000_003 + env.rank + 1
    torch.manual_seed(seed)  # per rank: drop-path masks differ across ranks
    resume_step = checkpointer.open_run(resume=cfg.trainer.resume)
    if resume_step is None:
        return 0, 0, None, None, None
    saved = checkpointer.load(resume_step, state)
    step = saved["step"]
    rank_states = checkpointer.read_rank_states(resume_step, saved)
    if saved["world_size"] == env.world_size:
        set_rng_state(rank_states[0]["rng"])
    else:  # another world size: a fresh per-rank stream, still a function of the step
        torch.manual_seed(seed + 7919 * step)
    if env.is_main:
        console.print(
            f"resumed run {checkpointer.run_id} from {checkpointer.store.path(resume_step)} at step {step} "
            f"(epoch {saved['epoch']}); saved by {saved['world_size']} ranks, now {env.world_size}"
        )
    loader_states = [s["loader"] for s in rank_states]
    return step, saved["epoch"], saved, f"{CHECKPOINT_FOLDER}/{step_folder(resume_step)}", loader_states


def _run_eval(
    cfg: TrainConfig, data_cfg: DataConfig, model: nn.Module, ema: ShardedEMA | None, env: DistEnv,
    metrics: MetricsWriter | None, step: int, factory: EvalLoaderFactory | None,
) -> dict[str, float]:  # fmt: skip
    if factory is None or not cfg.data.eval_source:
        return {}
    results: dict[str, float] = {}
    variants = [("eval", None)] + ([("eval_ema", ema)] if ema is not None else [])
    for prefix, averaged in variants:
        loader = factory(data_cfg, rank=env.rank, world_size=env.world_size, device=env.device)
        if averaged is None:
            scores = evaluate(model, loader, env, cfg.data.image_size, cfg.trainer.max_eval_batches)
        else:
            with averaged.swapped_in():
                scores = evaluate(model, loader, env, cfg.data.image_size, cfg.trainer.max_eval_batches)
        results.update({f"{prefix}/{k}": v for k, v in scores.items()})
    if metrics is not None:
        metrics.log(step, results, table="eval")
    return results


def _progress(console: Console, total: int, done: int, *, enabled: bool) -> Progress:
    columns = (TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn())  # fmt: skip
    return Progress(*columns, console=console, disable=not enabled, transient=False)
