"""``defocus-scale analyze``: the paper's over-focus diagnostics for one or more models, side by side on the
same images.

A model is a registered name (randomly initialised, e.g. for a smoke run; ``--model-arg key=value``
overrides its keyword arguments), a checkpoint exported by the trainer (``.safetensors``; it stores its own
variant, size and input size, and ``--model-arg`` replaces some, e.g. ``backend``) or a released
De-focus Mamba checkpoint (``.pth``/``.pt``). Images come from a directory (searched recursively; files
that do not decode are skipped and counted) or ``synthetic`` (the built-in synthetic images).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

from defocus_scale.analysis.report import ModelUnderAnalysis, analyze_models
from defocus_scale.data.synthetic import synthetic_batch
from defocus_scale.models import create_model, list_models, load_official_checkpoint

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OFFICIAL_SUFFIXES = (".pth", ".pt")


class AnalysisInputError(ValueError):
    """A model or image source given to ``analyze`` that cannot be used."""


def parse_model_args(pairs: list[str], models: list[str]) -> dict[str, dict[str, Any]]:
    """``[MODEL:]key=value`` strings to keyword arguments per model (values are Python literals where
    they parse); without ``MODEL:`` an argument applies to every model."""
    per_model: dict[str, dict[str, Any]] = {model: {} for model in models}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        target, colon, key = key.rpartition(":") if ":" in key else ("", "", key)
        if not sep or not key:
            raise AnalysisInputError(f"--model-arg expects [MODEL:]key=value, got {pair!r}")
        if colon and target not in per_model:
            raise AnalysisInputError(f"--model-arg {pair!r} names {target!r}, which is not among the models")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        for model in [target] if colon else models:
            per_model[model][key] = value
    return per_model


def _family_of(name: str) -> str:
    for family in ("defocus_mamba", "defocus_retnet", "defocus_vit", "causal_vit", "deit", "mamba", "retnet"):
        if name in list_models(family):
            return family
    return "unknown"


def load_subject(spec: str, model_args: dict[str, Any], seed: int) -> ModelUnderAnalysis:
    """One model from a registered name or a checkpoint path."""
    path = Path(spec)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise AnalysisInputError(f"exported checkpoint {path} does not exist")
        try:
            from defocus_scale.train.export import load_exported
        except ImportError as exc:
            raise AnalysisInputError(
                f"cannot load {path}: defocus_scale.train.export.load_exported is not available ({exc})"
            ) from exc
        try:
            with safe_open(str(path), framework="pt") as handle:
                name = (handle.metadata() or {}).get("model", "")
            model = load_exported(path, **model_args)
        except (SafetensorError, ValueError, KeyError, RuntimeError) as exc:
            raise AnalysisInputError(f"cannot load exported checkpoint {path}: {exc}") from exc
        except TypeError as exc:
            raise AnalysisInputError(f"{path}: bad --model-arg: {exc}") from exc
        # The stored variant name gives the family (causal_vit and defocus_vit share one class).
        return ModelUnderAnalysis(path.stem, _family_of(name), model)
    if path.suffix in OFFICIAL_SUFFIXES:
        accepted = inspect.signature(load_official_checkpoint).parameters
        unknown = sorted(set(model_args) - set(accepted))
        if unknown:
            raise AnalysisInputError(f"--model-arg {unknown} do not apply to a released checkpoint ({path})")
        return ModelUnderAnalysis(path.stem, "defocus_mamba", load_official_checkpoint(path, **model_args))
    if spec not in list_models():
        raise AnalysisInputError(
            f"{spec!r} is neither a registered model nor a .safetensors/.pth checkpoint "
            f"(registered: {', '.join(list_models())})"
        )
    torch.manual_seed(seed)
    try:
        model = create_model(spec, **model_args)
    except TypeError as exc:
        raise AnalysisInputError(f"model {spec}: bad --model-arg: {exc}") from exc
    return ModelUnderAnalysis(spec, _family_of(spec), model)


def find_images(directory: Path, count: int, per_class: bool = False) -> tuple[list[Image.Image], list[str]]:
    """The first ``count`` decodable images under ``directory`` in sorted path order; with ``per_class``,
    the first ``count`` of each immediate subfolder (an ImageFolder class), taken in turn (the first image
    of every class, then the second, ...), so that any prefix of the list spans the classes."""
    if not directory.is_dir():
        raise AnalysisInputError(f"image directory {directory} does not exist")

    def candidates(root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)

    folders = sorted(p for p in directory.iterdir() if p.is_dir()) if per_class else [directory]
    if not folders:
        raise AnalysisInputError(f"--per-class: {directory} has no class subfolders")
    chosen: list[list[tuple[Path, Image.Image]]] = []
    skipped = 0
    for folder in folders:
        found: list[tuple[Path, Image.Image]] = []
        for path in candidates(folder):
            if len(found) == count:
                break
            try:
                with Image.open(path) as image:
                    found.append((path, image.convert("RGB")))
            except (UnidentifiedImageError, OSError) as exc:
                skipped += 1
                log.warning("skipping %s: not a decodable image (%s)", path, exc)
        chosen.append(found)
    if skipped:
        log.warning("skipped %d undecodable files under %s", skipped, directory)
    in_turn = [found[i] for i in range(count) for found in chosen if i < len(found)]
    if not in_turn:
        raise AnalysisInputError(f"no decodable images ({', '.join(IMAGE_SUFFIXES)}) under {directory}")
    return [image for _, image in in_turn], [str(path.relative_to(directory)) for path, _ in in_turn]


def image_loader(
    source: str, count: int, per_class: bool = False
) -> tuple[Callable[[int], tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """``(load(img_size) -> (pixels in [0, 1], normalised), image names)`` for a directory or
    ``synthetic``; every model sees the same images at its own input size (resize, centre crop)."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    if source == "synthetic":

        def load(img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
            pixels, _ = synthetic_batch(0, count, image_size=img_size, num_classes=10, seed=0)
            return pixels, (pixels - mean) / std

        return load, [f"synthetic/{i}" for i in range(count)]
    images, names = find_images(Path(source), count, per_class)

    def load(img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        resize = v2.Compose([
            v2.PILToTensor(), v2.Resize(int(img_size / 0.875), antialias=True), v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
        ])  # fmt: skip
        pixels = torch.stack([resize(image) for image in images])
        return pixels, (pixels - mean) / std

    return load, names


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze", help="over-focus diagnostics (token mixing, gradient maps) of models, side by side",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("models", nargs="+", metavar="MODEL_OR_CKPT",
                        help="registered model name, exported .safetensors or released .pth")  # fmt: skip
    parser.add_argument("--images", required=True, help="image directory, or 'synthetic'")
    parser.add_argument("--out", required=True, type=Path, help="output directory (table and PNGs)")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="0-based blocks for gradient maps (negative counts from the end); the "
                             "map figures show the first; default: depth - 2, as in the paper")  # fmt: skip
    parser.add_argument("--num-images", type=int, default=4, help="images in all, or per class")
    parser.add_argument("--per-class", action="store_true",
                        help="take --num-images from each subfolder (class) of --images")  # fmt: skip
    parser.add_argument("--plot-images", type=int, default=2,
                        help="how many images (the first ones) get map figures")  # fmt: skip
    parser.add_argument("--model-arg", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                        help="keyword argument for every model, or for MODEL only (registered: "
                             "create_model overrides; .safetensors: replace stored arguments, e.g. "
                             "backend; .pth: load_official_checkpoint options)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of registered models")
    parser.add_argument("--device", default="cpu", help="torch device for the models, e.g. cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_images < 1:
        raise AnalysisInputError(f"--num-images must be at least 1, got {args.num_images}")
    model_args = parse_model_args(args.model_arg, args.models)
    subjects = [load_subject(spec, model_args[spec], args.seed) for spec in args.models]
    for subject in subjects:
        subject.model.to(args.device)
    labels = [s.label for s in subjects]
    for i, subject in enumerate(subjects):  # the same model twice (e.g. two seeds) keeps distinct labels
        if labels.count(subject.label) > 1:
            subject.label = f"{subject.label}#{i}"
    if args.per_class and args.images == "synthetic":
        raise AnalysisInputError("--per-class needs an image directory, not 'synthetic'")
    load, names = image_loader(args.images, args.num_images, args.per_class)
    table = analyze_models(subjects, load, names, args.out, args.layers, args.plot_images)
    print(f"wrote {table.num_rows} rows to {args.out / 'overfocus.parquet'} and plots to {args.out}")
    return 0
