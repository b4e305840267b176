"""What ``defocus-scale eval`` scores and on what: the model (a run directory or DCP checkpoint folder, an
exported safetensors file, or a released ``.pth``) and the validation source (WebDataset shards as
``make-shards`` writes them, or an ImageFolder tree / Hugging Face Parquet files, converted to shards once
into a cache directory by the same ``make_shards``)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from defocus_scale.data.manifest import read_classes
from defocus_scale.train.checkpoint import TRAINER_STATE, CheckpointError

RELEASE_22K_CLASSES = 21841


@dataclass
class ModelSource:
    """A model to evaluate: how to build it (``name`` + ``overrides`` through ``create_model``), which
    weights, and its evaluation data settings (``data``: image_size, eval_crop_pct, interpolation, mean, std,
    num_classes)."""

    path: str
    kind: str  # "run" | "export" | "release"
    name: str
    overrides: dict[str, Any]
    weights: str  # "live" | "ema"
    data: dict[str, Any] = field(default_factory=dict)


def _model_data_defaults(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The model's own eval transform: its timm pretrained config (a meta build, no memory)."""
    from timm.data import resolve_data_config

    from defocus_scale.models import create_model

    with torch.device("meta"):
        model = create_model(name, **overrides)
    cfg = resolve_data_config(model=model)
    return {
        "image_size": cfg["input_size"][-1],
        "eval_crop_pct": cfg["crop_pct"],
        "interpolation": cfg["interpolation"],
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "num_classes": model.num_classes,
    }


def resolve_model(path: str, *, ema: bool = False, release: dict[str, Any] | None = None) -> ModelSource:
    """Identify ``path``'s kind and read how to rebuild its model (no weights are read yet, except a released
    file's, whose shapes give the architecture). ``release``: settings for a released file that its config
    does not say (``group_size``, ``rope_scale``, ``delta_scale``, ``img_size``, ``token_order``)."""
    from defocus_scale.train.export import _open_checkpoint, exported_metadata, is_dcp_checkpoint, model_spec

    if is_dcp_checkpoint(path):
        store, step = _open_checkpoint(path)
        name, overrides, data = model_spec(store.read_json(step, TRAINER_STATE))
        if ema and not any(
            k.startswith("train.ema.") for k in store.reader(step).read_metadata().state_dict_metadata
        ):
            raise CheckpointError(f"checkpoint {store.path(step)} has no EMA (trainer.ema_decay was 0)")
        kind, weights = "run", "ema" if ema else "live"
    elif str(path).endswith(".safetensors"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        metadata = exported_metadata(path)
        name, overrides, data, weights = (
            metadata["model"],
            metadata["overrides"],
            metadata["data"],
            metadata["weights"],
        )
        if ema and weights != "ema":
            raise CheckpointError(
                f"{path} holds the {weights or 'exported'} weights only; export with --ema for EMA"
            )
        kind = "export"
    elif Path(path).is_file():
        from defocus_scale.models.official import release_model_kwargs
        from defocus_scale.models.release import read_checkpoint

        name, overrides = release_model_kwargs(read_checkpoint(path), use_ema=ema, **(release or {}))
        kind, weights, data = "release", "ema" if ema else "live", {}
    else:
        raise FileNotFoundError(
            f"{path} is neither a run directory / DCP checkpoint folder, an exported "
            ".safetensors file nor a released .pth file"
        )
    return ModelSource(
        str(path), kind, name, overrides, weights, {**_model_data_defaults(name, overrides), **data}
    )


@torch.no_grad()
def load_weights(model: nn.Module, source: ModelSource) -> None:
    """Fill the (sharded) model with the source's weights on every rank: a run's DCP checkpoint is read
    sharded (resharded to this world size); a file is read whole and sharded by ``set_model_state_dict``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    if source.kind == "run":
        from defocus_scale.train.export import _open_checkpoint

        store, step = _open_checkpoint(source.path)
        state = get_model_state_dict(model)
        if source.weights == "ema":
            params = {n for n, p in model.named_parameters() if p.requires_grad}
            request = {
                "model": {k: v for k, v in state.items() if k not in params},
                "ema": {k: v for k, v in state.items() if k in params},
            }
        else:
            request = {"model": state}
        dcp.load({"train": request}, storage_reader=store.reader(step))
        set_model_state_dict(model, {k: v for part in request.values() for k, v in part.items()})
        return
    from defocus_scale.models.release import read_checkpoint

    checkpoint = read_checkpoint(source.path)  # an export holds one set (its metadata says which)
    weights = checkpoint.state_dict(source.kind == "release" and source.weights == "ema")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))


def read_class_map(path: str | None) -> list[int] | None:
    """The release's ``map22kto1k.txt`` layout: one index into the model's classes per line, line i for
    class i of the evaluation set."""
    if path is None:
        return None
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    try:
        return [int(line) for line in lines]
    except ValueError as exc:
        raise ValueError(f"class map {path}: every line must be one class index ({exc})") from None


def check_classes(model_classes: int, data_classes: int | None, class_map: list[int] | None) -> None:
    if class_map is not None:
        if max(class_map) >= model_classes or min(class_map) < 0:
            raise ValueError(
                f"the class map names classes up to {max(class_map)}, the model has {model_classes}"
            )
        if data_classes is not None and len(class_map) != data_classes:
            raise ValueError(
                f"the class map has {len(class_map)} lines, the evaluation set {data_classes} classes"
            )
        return
    if data_classes is None or model_classes == data_classes:
        return
    hint = (
        (
            " (a 21k-class released model on ImageNet-1k: pass --class-map with the release's "
            "classification/data/map22kto1k.txt, as its evaluation does)"
        )
        if model_classes == RELEASE_22K_CLASSES
        else ""
    )
    raise ValueError(
        f"the model predicts {model_classes} classes, the evaluation set has {data_classes}{hint}"
    )


def _is_shard_source(source: str) -> bool:
    path = Path(source)
    if "://" in source or "{" in source or source.endswith(".tar"):
        return True
    if path.is_dir():
        return (path / "manifest.parquet").is_file() or any(path.glob("*.tar"))
    if source.endswith(".parquet") and path.is_file():
        return {"shard", "samples"} <= set(pq.read_schema(path).names)  # a manifest, not data
    return False


def prepare_data(source: str, cache_dir: str | None, *, is_main: bool) -> tuple[str, list[str] | None]:
    """(shard source, class names if known). An ImageFolder tree or Parquet data is converted to shards
    (source order, original bytes) once, by rank 0, into ``cache_dir`` (default: a folder in the system's
    temporary directory named after the source; it must be shared by all ranks)."""
    if _is_shard_source(source):
        names = None
        if Path(source).is_dir() and (Path(source) / "classes.json").is_file():
            names = read_classes(source)
        return source, names
    if not Path(source).exists() and not any(c in source for c in "*?["):
        raise FileNotFoundError(f"validation source {source} does not exist")
    digest = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("TMPDIR", "/tmp")) / "defocus-scale-eval"
    out = root / f"{Path(source).name or 'source'}-{digest}"
    if is_main and not (out / "manifest.parquet").is_file():
        from defocus_scale.data.make_shards import make_shards

        make_shards(source, out, prefix="val", shuffle_seed=None, progress=False, overwrite=True)
    if dist.is_initialized():
        dist.barrier()
    return str(out), read_classes(out)


def default_data(source: ModelSource, overrides: dict[str, Any]) -> dict[str, Any]:
    """The evaluation transform: the model's / run's settings, ``overrides`` (command line) on top."""
    data = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, **source.data}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return data
