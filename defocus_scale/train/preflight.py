"""Checks of a run's inputs and outputs: those a launcher makes once, before any worker starts (a misspelt
data path or an unwritable run directory is then one message naming the key, not a worker failure that
the orchestration retries until its budget is gone), and the one every rank makes at start: that all ranks
see the same run directory and data (the checkpoint protocol -- rank 0 commits, every rank loads -- needs
shared storage)."""

from __future__ import annotations

import os
import socket
import uuid

import fsspec
import torch.distributed as dist

from defocus_scale.train.config import ConfigError, TrainConfig


def check_run_inputs(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the key if a data source does not resolve to shards, the run
    directory cannot be written, or (for a fresh run) ``trainer.init_from`` does not exist. Synthetic data
    (``synthetic_data``) is written by the run itself, so its sources are not checked."""
    from defocus_scale.data.stream import resolve_shards
    from defocus_scale.train.checkpoint import CheckpointStore

    if cfg.synthetic_data is None:
        for key, source in (("data.source", cfg.data.source), ("data.eval_source", cfg.data.eval_source)):
            if not source:
                continue
            try:
                resolve_shards(source)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{key}={source}: {exc}") from None
    run_dir = cfg.trainer.run_dir.rstrip("/")
    try:
        fs, root = fsspec.core.url_to_fs(run_dir)
        fs.makedirs(root, exist_ok=True)
        probe = f"{root.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"trainer.run_dir={run_dir} cannot be written: {exc}") from None
    source = cfg.trainer.init_from
    if source and not (cfg.trainer.resume and CheckpointStore(run_dir).steps()):
        fs, path = fsspec.core.url_to_fs(source)
        if not fs.exists(path):
            raise ConfigError(f"trainer.init_from={source} does not exist")


def check_shared_storage(run_dir: str, sources: dict[str, str | None], *, rank: int) -> None:
    """Collective, at the start of a run: rank 0 writes a probe file with a fresh token under ``run_dir``;
    every rank must read it back, and every rank must find a local data source in ``sources`` ({config
    key: path}) if any rank does. Otherwise every rank raises :class:`ConfigError` naming the ranks, their
    hosts and the path (a node-local directory such as /tmp works on one node only): without it, rank 0
    alone would see the commit markers and every restart would fail to load. A source no rank finds is
    left to the data loader's own error (a misspelt path, not a storage layout)."""
    token: list[str | None] = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    fs, root = fsspec.core.url_to_fs(run_dir)
    probe = f"{root.rstrip('/')}/.shared-storage-probe-{token[0]}"
    problem = None
    if rank == 0:
        try:
            fs.makedirs(root, exist_ok=True)
            fs.pipe_file(probe, token[0].encode())
        except OSError as exc:
            problem = f"cannot write {probe}: {exc}"
    dist.barrier()
    if problem is None:
        try:
            if fs.cat_file(probe).decode() != token[0]:
                problem = f"reads other contents from {probe} than rank 0 wrote"
        except FileNotFoundError:
            problem = f"does not see {probe}, which rank 0 wrote in trainer.run_dir={run_dir}"
        except OSError as exc:
            problem = f"cannot read {probe}: {exc}"
    missing = [key for key, source in sources.items() if source and "://" not in source
               and not os.path.exists(os.path.dirname(source) if "{" in source else source)]  # fmt: skip
    found: list[tuple[str, str | None, list[str]]] = [("", None, [])] * dist.get_world_size()
    dist.all_gather_object(found, (socket.gethostname(), problem, missing))
    if rank == 0:
        try:
            fs.rm_file(probe)
        except OSError:
            pass
    failing = [(r, host, why) for r, (host, why, _) in enumerate(found) if why is not None]
    for key, source in sources.items():
        lacking = [r for r, (_, _, keys) in enumerate(found) if key in keys]
        if 0 < len(lacking) < len(found):  # some ranks see it, some do not
            failing += [(r, found[r][0], f"does not see {key}={source}") for r in lacking]
    if failing:
        shown = "; ".join(f"rank {r} on {host} {why}" for r, host, why in failing[:4])
        more = f" (and {len(failing) - 4} more)" if len(failing) > 4 else ""
        raise ConfigError(
            f"the ranks do not share storage: {shown}{more}. trainer.run_dir and the data must be on storage "
            "every node sees (a shared filesystem or an object store URL), not a node-local path"
        )
