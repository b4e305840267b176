"""Checks of a run's inputs and outputs that a launcher makes once, before any worker starts: a misspelt
data path or an unwritable run directory is then one message naming the key, not a worker failure that
the orchestration retries until its budget is gone."""

from __future__ import annotations

import uuid

import fsspec

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
