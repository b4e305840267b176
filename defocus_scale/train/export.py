"""Single-file inference checkpoints: ``defocus-scale export CKPT OUT.safetensors [--ema]`` (a DCP
checkpoint) and ``defocus-scale convert RELEASED.pth OUT.safetensors`` (a released De-focus Mamba file).

The file holds the full (unsharded) weights plus, in the safetensors metadata, the model name, the keyword
arguments it was built with and its evaluation data settings, so :func:`load_exported` rebuilds it with
``create_model`` alone -- no torch.distributed, no config files. :func:`init_from` starts a run from any of
the three kinds of weights (``trainer.init_from``)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from defocus_scale.models import create_model
from defocus_scale.train.checkpoint import TRAINER_STATE, CheckpointError, CheckpointStore

logger = logging.getLogger(__name__)

FORMAT = "defocus-scale/export-v1"
_DATA_KEYS = ("image_size", "num_classes", "eval_crop_pct", "interpolation", "mean", "std")


def _open_checkpoint(checkpoint: str) -> tuple[CheckpointStore, int]:
    """``checkpoint`` is a checkpoint folder (``.../checkpoints/step_N``) or a run directory (its newest
    complete checkpoint)."""
    path = checkpoint.rstrip("/")
    parent, _, name = path.rpartition("/")
    if name.startswith("step_") and parent.endswith("/checkpoints") or parent == "checkpoints":
        store = CheckpointStore(parent.rpartition("/")[0] or ".")
        step = int(name.removeprefix("step_"))
        problem = store.problem(step)
        if problem is not None:
            raise CheckpointError(f"checkpoint {checkpoint} is not usable: {problem}")
        return store, step
    store = CheckpointStore(path)
    step, skipped = store.newest_complete()
    if step is None:
        reasons = "; ".join(f"step {s}: {r}" for s, r in skipped) or "no checkpoints"
        raise CheckpointError(f"{checkpoint} holds no complete checkpoint ({reasons})")
    return store, step


def is_dcp_checkpoint(path: str | Path) -> bool:
    """A run directory (with ``checkpoints/``) or one of its checkpoint folders, on a local disk or any
    fsspec filesystem (``s3://...``)."""
    fs, root = fsspec.core.url_to_fs(str(path))
    root = root.rstrip("/")
    return fs.isdir(root) and (fs.isdir(f"{root}/checkpoints") or fs.isfile(f"{root}/{TRAINER_STATE}"))


def read_dcp_weights(checkpoint: str, *, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full (unsharded) live or EMA weights of a DCP checkpoint in this process (any world size saved
    it; no collectives), and its trainer state. EMA weights: the parameters' averages and the live buffers."""
    store, step = _open_checkpoint(checkpoint)
    saved = store.reader(step).read_metadata().state_dict_metadata

    def tensors(prefix: str) -> dict[str, torch.Tensor]:
        return {key[len(prefix):]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                for key, meta in saved.items()
                if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}  # fmt: skip

    model, averaged = tensors("train.model."), tensors("train.ema.") if ema else {}
    if ema and not averaged:
        raise CheckpointError(f"checkpoint {store.path(step)} has no EMA (trainer.ema_decay was 0)")
    request = {"model": {k: v for k, v in model.items() if k not in averaged}}
    if averaged:
        request["ema"] = averaged
    with warnings.catch_warnings():  # DCP warns that it reads in one process: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"train": request}, storage_reader=store.reader(step), no_dist=True)
    trainer_state = store.read_json(step, TRAINER_STATE)
    trainer_state["_checkpoint_id"], trainer_state["_step"] = store.checkpoint_id(step), step
    return {**request["model"], **averaged}, trainer_state


def model_spec(trainer_state: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(model name, its keyword arguments, the run's evaluation data settings) from a checkpoint's config."""
    config = trainer_state["config"]
    overrides = {"img_size": config["data"]["image_size"], "num_classes": config["data"]["num_classes"],
                 **config["model"]["overrides"]}  # fmt: skip
    return (
        config["model"]["name"],
        overrides,
        {k: config["data"][k] for k in _DATA_KEYS if k in config["data"]},
    )


def write_export(out_path: str | Path, tensors: dict[str, torch.Tensor], name: str, overrides: dict[str, Any],
                 **metadata: Any) -> dict[str, str]:  # fmt: skip
    """Write ``tensors`` with the metadata :func:`load_exported` needs; returns the metadata."""
    data = metadata.pop("data", {})
    metadata = {"format": FORMAT, "model": name, "overrides": json.dumps(overrides), "data": json.dumps(data),
                **{k: str(v) for k, v in metadata.items()}}  # fmt: skip
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_path), metadata=metadata)
    return metadata


def export_checkpoint(checkpoint: str, out_path: str | Path, *, ema: bool = False) -> dict[str, Any]:
    """Write the live (or EMA) weights of a DCP checkpoint as one safetensors file; returns its metadata."""
    weights, trainer_state = read_dcp_weights(checkpoint, ema=ema)
    name, overrides, data = model_spec(trainer_state)
    with torch.device("meta"):
        expected = set(create_model(name, **overrides).state_dict())
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(
            f"{checkpoint} does not match {name}: missing {missing[:6]}, unexpected {extra[:6]}"
        )
    return write_export(
        out_path, weights, name, overrides, data=data, weights="ema" if ema else "live",
        step=trainer_state["_step"], source=trainer_state["_checkpoint_id"],
    )  # fmt: skip


def convert_release(
    path: str | Path, out_path: str | Path, *, ema: bool = False, **settings: Any
) -> dict[str, str]:
    """Write a released De-focus Mamba checkpoint (read without unpickling code) as an exported file;
    ``settings`` (``group_size``, ``rope_scale``, ``delta_scale``, ``img_size``, ``token_order``) fill
    what its
    config does not say, see :func:`defocus_scale.models.official.release_model_kwargs`."""
    from defocus_scale.models.official import release_model_kwargs
    from defocus_scale.models.release import read_checkpoint

    checkpoint = read_checkpoint(path)
    name, kwargs = release_model_kwargs(checkpoint, use_ema=ema, **settings)
    data = {"image_size": kwargs["img_size"], "num_classes": kwargs["num_classes"], "eval_crop_pct": 0.875,
            "interpolation": "bicubic"}  # the release's: resize to 256/224 of the crop, bicubic  # fmt: skip
    return write_export(out_path, checkpoint.state_dict(ema), name, kwargs, data=data,
                        weights="ema" if ema else "live", step="", source=str(path))  # fmt: skip


def read_weights(source: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights ``trainer.init_from`` starts from, and which they are: an exported (or plain) safetensors
    file; a torch file (a state dict, or a released checkpoint, read without unpickling code); a DCP run
    directory or checkpoint folder. Where there are EMA weights (a released ``model_ema``, a DCP checkpoint
    saved with EMA), those."""
    from defocus_scale.models.release import read_checkpoint

    if is_dcp_checkpoint(source):
        store, step = _open_checkpoint(str(source))
        saved = store.reader(step).read_metadata().state_dict_metadata
        has_ema = any(key.startswith("train.ema.") for key in saved)
        weights, state = read_dcp_weights(str(source), ema=has_ema)
        return weights, f"{'EMA' if has_ema else 'live'} weights of {state['_checkpoint_id']}"
    checkpoint = read_checkpoint(source)
    use_ema = checkpoint.ema is not None
    return checkpoint.state_dict(
        use_ema
    ), f"{'EMA' if use_ema else 'live'} weights of {source} ({checkpoint.kind})"


def init_from(model: nn.Module, source: str | Path) -> list[str]:
    """Copy the weights of ``source`` (see :func:`read_weights`) into a (sharded) model; tensors whose shapes
    differ (e.g. a 21k-class head for a 1k fine-tune) or that the source lacks keep their fresh
    initialisation. Returns the names of those (and logs which weights were read)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights, origin = read_weights(source)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    usable = {k: v for k, v in weights.items() if shapes.get(k) == tuple(v.shape)}
    if not usable:
        raise CheckpointError(f"{source}: no tensor fits the model (keys {sorted(weights)[:5]} ...)")
    skipped = sorted(set(weights) - set(usable)) + sorted(set(shapes) - set(weights))
    set_model_state_dict(model, usable, options=StateDictOptions(full_state_dict=True, strict=False))
    logger.info("initialised from the %s", origin)
    return skipped


def exported_metadata(path: str | Path) -> dict[str, Any]:
    """An exported file's model name, keyword arguments and evaluation data settings."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a defocus-scale export (metadata format {metadata.get('format')!r})")
    return {"model": metadata["model"], "overrides": json.loads(metadata["overrides"]),
            "data": json.loads(metadata.get("data", "{}")),
            "weights": metadata.get("weights", "")}  # fmt: skip


def load_exported(path: str | Path, **overrides: Any) -> nn.Module:
    """The model of an exported file, built by ``create_model`` with its stored arguments (``overrides``
    replace some, e.g. ``backend``), weights loaded strictly, in eval mode."""
    metadata = exported_metadata(path)
    with safe_open(str(path), framework="pt") as handle:
        weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    model = create_model(metadata["model"], **{**metadata["overrides"], **overrides})
    model.load_state_dict(weights, strict=True)
    return model.eval()
