"""Single-file inference checkpoints: ``defocus-scale export CKPT OUT.safetensors [--ema]``.

The file holds the full (unsharded) weights plus, in the safetensors metadata, the model name and the
keyword arguments it was built with, so :func:`load_exported` rebuilds it with ``create_model`` alone --
no torch.distributed, no config files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from defocus_scale.models import create_model
from defocus_scale.train.checkpoint import TRAINER_STATE, CheckpointError, CheckpointStore

FORMAT = "defocus-scale/export-v1"


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


def export_checkpoint(checkpoint: str, out_path: str | Path, *, ema: bool = False) -> dict[str, Any]:
    """Write the live (or EMA) weights of a DCP checkpoint as one safetensors file; returns its metadata."""
    store, step = _open_checkpoint(checkpoint)
    trainer_state = store.read_json(step, TRAINER_STATE)
    config = trainer_state["config"]
    name = config["model"]["name"]
    overrides = {"img_size": config["data"]["image_size"], "num_classes": config["data"]["num_classes"],
                 **config["model"]["overrides"]}  # fmt: skip
    with torch.device("meta"):
        model = create_model(name, **overrides)
    model.to_empty(device="cpu")  # no initialisation: DCP fills every saved tensor
    weights = model.state_dict()  # full tensors; DCP fills them from the shards of any world size
    if ema:
        if "ema" not in _saved_roots(store, step):
            raise CheckpointError(f"checkpoint {store.path(step)} has no EMA (trainer.ema_decay was 0)")
        parameters = {n for n, _ in model.named_parameters()}
        request = {"train": {"model": {k: v for k, v in weights.items() if k not in parameters},
                             "ema": {k: v for k, v in weights.items() if k in parameters}}}  # fmt: skip
    else:
        request = {"train": {"model": weights}}
    with warnings.catch_warnings():  # DCP warns that it reads in one process: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(request, storage_reader=store.reader(step), no_dist=True)
    metadata = {
        "format": FORMAT, "model": name, "overrides": json.dumps(overrides),
        "weights": "ema" if ema else "live",
        "step": str(step), "source": store.checkpoint_id(step),
    }  # fmt: skip
    tensors = {k: v.contiguous() for k, v in weights.items()}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_path), metadata=metadata)
    return metadata


def _saved_roots(store: CheckpointStore, step: int) -> set[str]:
    metadata = store.reader(step).read_metadata()
    return {key.split(".")[1] for key in metadata.state_dict_metadata if key.startswith("train.")}


def init_from_exported(model: nn.Module, path: str | Path) -> list[str]:
    """Copy an exported file's weights into a (sharded) model; tensors whose shapes differ (e.g. a 21k-class
    head for a 1k fine-tune) keep their fresh initialisation. Returns the names of those skipped."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    weights, skipped = {}, []
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            tensor = handle.get_tensor(key)
            if shapes.get(key) == tuple(tensor.shape):
                weights[key] = tensor
            else:
                skipped.append(key)
    skipped += sorted(set(shapes) - set(weights) - set(skipped))
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    return skipped


def load_exported(path: str | Path, **overrides: Any) -> nn.Module:
    """The model of an exported file, built by ``create_model`` with its stored arguments (``overrides``
    replace some, e.g. ``backend``), weights loaded strictly, in eval mode."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a defocus-scale export (metadata format {metadata.get('format')!r})"
            )
        weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    kwargs = {**json.loads(metadata["overrides"]), **overrides}
    model = create_model(metadata["model"], **kwargs)
    model.load_state_dict(weights, strict=True)
    return model.eval()
