"""Process group, device and the sharded model: meta build -> activation checkpointing -> FSDP2 per block
and at the root -> materialise on the target device -> ``init_weights``. No rank ever holds the full model."""

from __future__ import annotations

import datetime
import functools
import os
import tempfile
import warnings
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
    device: str = "auto", backend: str | None = None, timeout_s: float | None = None, replicate: int = 1,
    flight_recorder_dir: str | None = None,
) -> DistEnv:  # fmt: skip
    """Join the process group torchrun (or Ray Train) describes, creating it if needed; a lone process
    without torchrun's variables becomes a world of one. NCCL on CUDA, gloo on CPU. ``timeout_s``: of the
    group's collectives, when this creates it. ``replicate`` > 1 makes the mesh 2-D for HSDP:
    ``(replicate, world / replicate)``, parameters sharded within a group of consecutive ranks (a node)
    and replicated across groups, so the per-step all-gathers stay inside a node. ``flight_recorder_dir``
    (the run directory): where an NCCL group this creates dumps its flight recorder on a timeout."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        backend = backend or ("nccl" if use_cuda else "gloo")
        if backend == "nccl" and flight_recorder_dir is not None:
            prepare_flight_recorder(flight_recorder_dir)
        if "WORLD_SIZE" in os.environ:  # torchrun, Ray Train or a launcher of one's own set the rendezvous
            dist.init_process_group(backend, timeout=timeout)
        else:  # a lone process: a world of one, without writing torchrun's variables into os.environ (a
            # child process inheriting them would try to join this process's store)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1, timeout=timeout)  # fmt: skip
    world = dist.get_world_size()
    if replicate < 1 or world % replicate:
        raise ValueError(
            f"trainer.dp_replicate={replicate} does not divide the world of {world} ranks (HSDP needs "
            "replicate x shard = world)"
        )
    if replicate == 1:
        mesh = init_device_mesh(target.type, (world,), mesh_dim_names=("dp_shard",))
    else:
        mesh = init_device_mesh(
            target.type, (replicate, world // replicate), mesh_dim_names=("dp_replicate", "dp_shard")
        )
    _check_backend(target)
    return DistEnv(dist.get_rank(), world, local_rank, target, mesh)


def set_collective_timeout(mesh: DeviceMesh, timeout_s: float) -> None:
    """Give the default group and the mesh's groups (HSDP's replicate and shard groups) a new timeout for
    their later collectives (the trainer shortens it after the first step)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    groups = {id(g): g for g in [dist.distributed_c10d._get_default_group(), *mesh.get_all_groups()]}
    for group in groups.values():
        dist.set_timeout(timeout, group)


FLIGHT_RECORDER_FOLDER = "flight_recorder"


def flight_recorder_env(run_dir: str) -> dict[str, str]:
    """NCCL flight recorder settings (ignored by gloo): keep the last collectives of every rank and dump
    them when a collective times out, one file per rank, for ``torch.distributed.flight_recorder``'s
    analyser. The dump goes under ``<run_dir>/flight_recorder/`` on a local or shared filesystem; for an
    object-store run directory, to the node's temporary directory (NCCL writes plain files)."""
    if "://" in run_dir and not run_dir.startswith("file://"):
        name = run_dir.rstrip("/").rsplit("/", 1)[-1]
        folder = os.path.join(tempfile.gettempdir(), "defocus-flight-recorder", name)
    else:
        folder = os.path.join(run_dir.removeprefix("file://"), FLIGHT_RECORDER_FOLDER)
    return {
        "TORCH_FR_BUFFER_SIZE": "20000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": os.path.join(folder, "rank_"),
    }


def worker_env(run_dir: str) -> dict[str, str]:
    """Environment variables for the launchers' worker processes, set before they import torch: the
    flight recorder's and this process's OpenMP wait settings (``GOMP_SPINCOUNT`` / ``OMP_WAIT_POLICY``,
    see ``defocus_scale/__init__``)."""
    openmp = {k: os.environ[k] for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in os.environ}
    return {**flight_recorder_env(run_dir), **openmp}


def prepare_flight_recorder(run_dir: str) -> str:
    """Set the flight recorder's variables in this process (where not set already; before the NCCL group
    is created) and create its dump folder; returns the dump prefix in force."""
    for key, value in flight_recorder_env(run_dir).items():
        os.environ.setdefault(key, value)
    prefix = os.environ["TORCH_FR_DUMP_TEMP_FILE"]
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    return prefix


def _check_backend(device: torch.device) -> None:
    """FSDP's collectives run on the training device: CUDA tensors need NCCL, CPU ones gloo. A mismatch
    (e.g. a GPU job whose launcher built a gloo group) fails here with the fix, not deep inside FSDP."""
    backend = str(dist.get_backend()).lower()
    if device.type == "cuda" and "nccl" not in backend:
        raise ValueError(
            f"training on {device} needs an NCCL process group, but the group is {backend!r}: set "
            "launcher.gpus_per_worker (Ray) or launcher.backend=nccl"
        )
    if device.type == "cpu" and backend == "nccl":
        raise ValueError("training on CPU needs a gloo process group, but the group is NCCL: check "
                         "trainer.device and launcher.backend")  # fmt: skip


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


RESHARD_POLICIES = ("default", "always", "never")


def shard_model(
    model: TokenClassifier,
    mesh: DeviceMesh,
    policy: MixedPrecisionPolicy,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    reshard_after_forward: str = "default",
) -> TokenClassifier:
    """Apply the model's plan in torchtitan's order: activation checkpointing and ``torch.compile`` per
    block, then FSDP2 per block, per head, and at the root (patch embedding, tokens, final norm). The
    heads are units of their own: at 21k classes with MLP heads they hold ~140M parameters, which the
    root unit would otherwise keep gathered around the whole forward and backward.

    ``reshard_after_forward``: ``default`` frees each block's gathered parameters after its forward
    except the last block's and the heads' (the backward needs them at once; torchtitan's choice),
    ``always`` frees all, ``never`` keeps every unit gathered from forward to backward (fewer all-gathers,
    the memory of the full parameters). A 2-D ``mesh`` gives HSDP (see :func:`init_distributed`).

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
    if reshard_after_forward not in RESHARD_POLICIES:
        raise ValueError(
            f"trainer.reshard_after_forward must be one of {RESHARD_POLICIES}; got {reshard_after_forward!r}"
        )
    low_precision = policy.param_dtype not in (None, torch.float32)
    keep_fp32 = set(model.fp32_parameter_names()) if low_precision else set()
    ignored = {p for name, p in model.named_parameters() if name in keep_fp32}
    for index, block in enumerate(blocks):
        forward = block.forward
        if activation_checkpointing:
            forward = functools.partial(torch.utils.checkpoint.checkpoint, forward, use_reentrant=False)
        if compile:
            forward = torch.compile(forward)
        block.forward = forward
        reshard = reshard_after_forward == "always" or (
            reshard_after_forward == "default" and index < len(blocks) - 1
        )
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard,
                    ignored_params={p for p in block.parameters() if p in ignored})  # fmt: skip
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        if any(p.requires_grad for p in head.parameters()):
            fully_shard(head, mesh=mesh, mp_policy=policy,
                        reshard_after_forward=reshard_after_forward == "always",
                        ignored_params={p for p in head.parameters() if p in ignored})  # fmt: skip
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored,
                reshard_after_forward=reshard_after_forward != "never")  # fmt: skip
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
    initialisation draws each shard from its own stream so shards differ; ``rank`` is the rank within
    the shard group, so HSDP's replicas of a shard start equal (DCP saves one replica: replicas that
    differed would silently become equal at a resume)."""
    model.to_empty(device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), implicit_replication(), warnings.catch_warnings():
        # DTensor warns that its random ops lack full support on CPU meshes: each shard draws from this
        # rank's own stream here on purpose, so the warning is noise (one per rank on every start).
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
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
    reshard_after_forward: str = "default",
) -> TokenClassifier:
    """The sharded, initialised model on ``env.device`` (an ``FSDPModule`` as well)."""
    model = build_model(name, overrides)
    policy = mixed_precision_policy(precision, env.device)
    shard_model(
        model, env.mesh, policy, activation_checkpointing=activation_checkpointing, compile=compile,
        reshard_after_forward=reshard_after_forward,
    )
    shard_rank = env.mesh.get_local_rank("dp_shard") if env.mesh.ndim > 1 else env.rank
    materialize(model, env.device, seed, shard_rank)
    broadcast_replicated(replicated_parameters(model))
    assert isinstance(model, FSDPModule)
    return model
