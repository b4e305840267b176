"""Process group, device and the sharded model: meta build -> activation checkpointing -> FSDP2 per block
and at the root -> materialise on the target device -> ``init_weights``. No rank ever holds the full model."""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from defocus_scale.models import TokenClassifier, create_model


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(
    device: str = "auto", backend: str | None = None, timeout_s: float | None = None
) -> DistEnv:
    """Join the process group torchrun (or Ray Train) describes, creating it if needed; a lone process
    without torchrun's variables becomes a world of one. NCCL on CUDA, gloo on CPU. ``timeout_s``: of the
    group's collectives, when this creates it."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        backend = backend or ("nccl" if use_cuda else "gloo")
        if "WORLD_SIZE" in os.environ:  # torchrun, Ray Train or a launcher of one's own set the rendezvous
            dist.init_process_group(backend, timeout=timeout)
        else:  # a lone process: a world of one, without writing torchrun's variables into os.environ (a
            # child process inheriting them would try to join this process's store)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1, timeout=timeout)  # fmt: skip
    mesh = init_device_mesh(target.type, (dist.get_world_size(),))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, target, mesh)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mixed_precision_policy(precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """``bf16``: bf16 compute with fp32 gradient reduction; ``fp32``; ``auto``: bf16 on CUDA, fp32 on CPU
    (CPU bf16 matmuls are slow). The family's fp32 parameters stay out of it (see :func:`shard_model`)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"trainer.precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(
    model: TokenClassifier,
    mesh: DeviceMesh,
    policy: MixedPrecisionPolicy,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> TokenClassifier:
    """Apply the model's plan in torchtitan's order: activation checkpointing and ``torch.compile`` per
    block, then FSDP2 per block and at the root.

    Precision plan: under a low-precision ``param_dtype`` the family's ``fp32_parameter_names()`` (the
    bandpass and SSM scalars) are left out of FSDP (``ignored_params``): replicated fp32 tensors that the
    forward reads as they are, whose gradients :func:`all_reduce_replicated_grads` averages. They are a
    few per mille of the weights. (A nested fp32 FSDP unit would keep them sharded, but its hooks would
    run inside every compiled block and break its graph.)

    Compile and checkpointing wrap each block's ``forward`` (an instance attribute), so FSDP2's hooks, run
    by ``Module.__call__``, stay outside the compiled graph and the state-dict names do not change."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks to shard")
    low_precision = policy.param_dtype not in (None, torch.float32)
    keep_fp32 = set(model.fp32_parameter_names()) if low_precision else set()
    ignored = {p for name, p in model.named_parameters() if name in keep_fp32}
    for block in blocks:
        forward = block.forward
        if activation_checkpointing:
            forward = functools.partial(torch.utils.checkpoint.checkpoint, forward, use_reentrant=False)
        if compile:
            forward = torch.compile(forward)
        block.forward = forward
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True,
                    ignored_params={p for p in block.parameters() if p in ignored})  # fmt: skip
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    return model


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters FSDP does not shard (the fp32 part of the precision plan)."""
    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


@torch.no_grad()
def all_reduce_replicated_grads(params: list[nn.Parameter], world_size: int) -> None:
    """Average the replicated parameters' gradients over the ranks (one collective), as FSDP averages
    the sharded ones; call after the step's last backward."""
    grads = [p.grad for p in params if p.grad is not None]
    if world_size == 1 or not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)  # gloo has no AVG
    flat /= world_size
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


@torch.no_grad()
def broadcast_replicated(params: list[nn.Parameter]) -> None:
    """Rank 0's values of the replicated parameters on every rank (after a per-rank initialisation)."""
    for p in params:
        dist.broadcast(p.data, src=0)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int, rank: int) -> None:
    """Allocate the (sharded) meta parameters on ``device`` and run the model's own initialisation.

    Plain tensors inside ``init_weights`` (e.g. ``A_log``'s table) count as replicated. Random
    initialisation draws each rank's shard from its own stream so shards differ."""
    model.to_empty(device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), implicit_replication():
        torch.manual_seed(seed * 1_000_003 + rank)
        model.init_weights()


def build_model(name: str, overrides: dict[str, Any]) -> TokenClassifier:
    with torch.device("meta"):
        model = create_model(name, **overrides)
    if not isinstance(model, TokenClassifier):
        raise TypeError(f"model {name!r} is a {type(model).__name__}, not a TokenClassifier")
    return model


def build_sharded_model(
    name: str,
    overrides: dict[str, Any],
    env: DistEnv,
    *,
    precision: str = "auto",
    activation_checkpointing: bool = False,
    compile: bool = False,
    seed: int = 0,
) -> TokenClassifier:
    """The sharded, initialised model on ``env.device`` (an ``FSDPModule`` as well)."""
    model = build_model(name, overrides)
    policy = mixed_precision_policy(precision, env.device)
    shard_model(
        model, env.mesh, policy, activation_checkpointing=activation_checkpointing, compile=compile
    )
    materialize(model, env.device, seed, env.rank)
    broadcast_replicated(replicated_parameters(model))
    assert isinstance(model, FSDPModule)
    return model
