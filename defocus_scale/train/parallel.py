"""Process group, device and the sharded model: meta build -> activation checkpointing -> FSDP2 per block
and at the root -> materialise on the target device -> ``init_weights``. No rank ever holds the full model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
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


def init_distributed(device: str = "auto", backend: str | None = None) -> DistEnv:
    """Join the process group torchrun (or Ray Train) describes, creating it if needed; a lone process
    without torchrun's variables becomes a world of one. NCCL on CUDA, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    mesh = init_device_mesh(target.type, (dist.get_world_size(),))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, target, mesh)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mixed_precision_policy(precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """``bf16``: bf16 compute with fp32 gradient reduction; ``fp32``; ``auto``: bf16 on CUDA, fp32 on CPU
    (gloo cannot reduce bf16 and CPU bf16 matmuls are slow)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"trainer.precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    policy: MixedPrecisionPolicy,
    *,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """FSDP2 on every block (so one block's parameters are gathered at a time) and on the root."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks to shard")
    for block in blocks:
        if activation_checkpointing:
            activation_checkpoint(block)  # composable: keeps the state-dict keys unchanged
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


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
    seed: int = 0,
) -> TokenClassifier:
    """The sharded, initialised model on ``env.device`` (an ``FSDPModule`` as well)."""
    model = build_model(name, overrides)
    policy = mixed_precision_policy(precision, env.device)
    shard_model(model, env.mesh, policy, activation_checkpointing=activation_checkpointing)
    materialize(model, env.device, seed, env.rank)
    assert isinstance(model, FSDPModule)
    return model


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each block in place (per block keeps FSDP2's hooks outside the graphs)."""
    for block in model.blocks:
        block.compile()
