"""Run the over-focus diagnostics on several models and the same images; write a Parquet table and PNGs.

Table ``overfocus.parquet``, one row per (model, layer, image, query, source):

* ``source``: ``mixing`` (token-mixing matrix), ``gradient_attention`` (the paper's gradient map of the
  layer; its ``class`` row is the receptive field) or ``loss_gradient``;
* ``query``: ``class`` (the last token), ``patch`` (mean over patch tokens) or ``loss``;
* ``entropy``, ``effective_tokens``, ``mean_distance`` (see ``diagnostics``).

Plots: ``effective_tokens.png`` (effective tokens of the mixing matrix per layer, class and patch
queries, one line per model), ``gradient_effective_tokens.png`` (the same for the gradient maps of the
layers that have them: class receptive field, patch rows, loss gradient) and ``maps_image<i>.png`` (per
model, at the first gradient layer: the mixing matrix, the gradient attention map, the class token's
receptive field and the loss gradient on the patch grid, and the image).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import nn  # noqa: E402

from defocus_scale.analysis.diagnostics import LayerDiagnostics, diagnose  # noqa: E402

TABLE_SCHEMA = pa.schema(
    [
        ("model", pa.string()), ("family", pa.string()), ("layer", pa.int32()), ("depth", pa.int32()),
        ("image", pa.string()), ("query", pa.string()), ("source", pa.string()),
        ("entropy", pa.float64()), ("effective_tokens", pa.float64()), ("mean_distance", pa.float64()),
    ]
)  # fmt: skip


@dataclass
class ModelUnderAnalysis:
    label: str
    family: str
    model: nn.Module


@dataclass
class ModelResult:
    subject: ModelUnderAnalysis
    images: torch.Tensor  # (n, 3, H, W) in [0, 1], as the model saw them before normalisation
    layers: list[LayerDiagnostics]
    gradient_layers: list[int]


def default_gradient_layer(depth: int) -> int:
    """The paper's figures use a deep layer: 11 of 12 (ViT), 22 of 24 (Mamba), i.e. ``depth - 2``."""
    return max(depth - 2, 0)


def table_rows(result: ModelResult, image_names: Sequence[str]) -> list[dict]:
    rows = []
    depth = len(result.layers)

    def add(layer: int, source: str, summary: dict[str, dict[str, torch.Tensor]]) -> None:
        for query, metrics in summary.items():
            for i, name in enumerate(image_names):
                rows.append(dict(
                    model=result.subject.label, family=result.subject.family, layer=layer, depth=depth,
                    image=name, query=query, source="loss_gradient" if query == "loss" else source,
                    **{metric: float(values[i].item()) for metric, values in metrics.items()},
                ))  # fmt: skip

    for diag in result.layers:
        add(diag.layer, "mixing", diag.mixing_summary)
        if diag.gradient_summary is not None:
            add(diag.layer, "gradient_attention", diag.gradient_summary)
    return rows


def _curve_panels(
    results: Sequence[ModelResult],
    panels: Sequence[tuple[str, str]],
    summary_of,
    title: str,
    path: Path,
) -> None:
    """One panel per ``(query, panel title)``: the mean over images of the effective tokens of that query
    per layer, one line per model; ``summary_of(layer diagnostics)`` picks the summary (or ``None``)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    length = 0
    for result in results:
        diags = [d for d in result.layers if summary_of(d) is not None]
        length = max(length, diags[0].mixing_map.shape[-1])
        for ax, (query, _) in zip(axes, panels):
            values = [summary_of(d)[query]["effective_tokens"].mean().item() for d in diags]
            ax.plot([d.layer + 1 for d in diags], values, "o-", label=result.subject.label)
    # The class token is last, so every key is visible to it: exp(H) = L when it spreads evenly.
    axes[0].axhline(length, color="grey", linestyle="--", linewidth=1, label=f"uniform over all {length}")
    for ax, (_, panel_title) in zip(axes, panels):
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("layer (1 = first block)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("effective number of tokens exp(H)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_effective_tokens(results: Sequence[ModelResult], path: Path) -> None:
    images = len(results[0].images)
    panels = (("class", "class token (last): its row of |M|"), ("patch", "patch tokens: rows of |M|, mean"))
    _curve_panels(
        results, panels, lambda d: d.mixing_summary,
        f"Token-mixing matrix M of each layer: effective tokens per query (mean over heads/channels "
        f"and {images} images)", path,
    )  # fmt: skip


def plot_gradient_effective_tokens(results: Sequence[ModelResult], path: Path) -> None:
    images = len(results[0].images)
    panels = (("class", "receptive field of the class token"), ("patch", "gradient-map rows of patch tokens"),
              ("loss", "loss gradient over patch tokens"))  # fmt: skip
    _curve_panels(
        results, panels, lambda d: d.gradient_summary,
        f"Gradient maps of the analysed layers: effective tokens (mean over {images} images)", path,
    )  # fmt: skip


def _patch_grid(values: torch.Tensor) -> np.ndarray:
    """Token values (class token last) as the patch grid."""
    patches = values[:-1].float().cpu().numpy()
    side = math.isqrt(len(patches))
    return patches.reshape(side, side)


def plot_maps(results: Sequence[ModelResult], image_index: int, path: Path, image_name: str = "") -> None:
    columns = ("mixing |M| (rows: query, cols: key)", "gradient attention map",
               "class receptive field (patch grid)",
               "loss gradient (patch grid)", "image")  # fmt: skip
    fig, axes = plt.subplots(len(results), len(columns), figsize=(3 * len(columns), 3 * len(results)),
                             squeeze=False)  # fmt: skip
    for row, result in enumerate(results):
        layer = result.gradient_layers[0]
        diag = result.layers[layer]
        panels = [
            diag.mixing_map[image_index].cpu().numpy(),
            diag.attention_map[image_index].cpu().numpy(),
            _patch_grid(diag.receptive_field[image_index]),
            _patch_grid(diag.loss_gradient[image_index]),
            result.images[image_index].permute(1, 2, 0).clamp(0, 1).cpu().numpy(),
        ]
        for col, (ax, panel) in enumerate(zip(axes[row], panels)):
            # A square-root colour scale keeps the weaker long-range entries visible beside the peaks.
            norm = None if col == 4 else PowerNorm(0.5, vmin=0.0)
            ax.imshow(panel, cmap=None if col == 4 else "viridis", norm=norm, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
        axes[row][0].set_ylabel(f"{result.subject.label}\nlayer {layer + 1}/{len(result.layers)}", fontsize=9)
    fig.suptitle(
        f"{image_name or f'image {image_index}'}: token maps of one layer per model; matrices and patch "
        "grids normalised per panel, square-root colour scale (bright = large)", fontsize=10,
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title above the columns
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze_models(
    subjects: Sequence[ModelUnderAnalysis],
    load_images,
    image_names: Sequence[str],
    out_dir: str | Path,
    layers: Sequence[int] | None = None,
    plot_images: int = 2,
) -> pa.Table:
    """Diagnose every model on the same images and write the table and plots under ``out_dir``.

    ``load_images(img_size) -> (pixels in [0, 1], normalised)`` gives the images at a model's input size;
    ``layers`` (0-based; negative counts from the end) get gradient maps, by default ``depth - 2``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for subject in subjects:
        depth = len(subject.model.blocks)
        chosen = [l + depth if l < 0 else l for l in layers] if layers else [default_gradient_layer(depth)]
        pixels, normalised = load_images(subject.model.img_size)
        device = next(subject.model.parameters()).device
        diagnostics = diagnose(subject.model, normalised.to(device), chosen)
        results.append(ModelResult(subject, pixels, diagnostics, chosen))
    rows = [row for result in results for row in table_rows(result, image_names)]
    table = pa.Table.from_pylist(rows, schema=TABLE_SCHEMA)
    pq.write_table(table, out / "overfocus.parquet")
    plot_effective_tokens(results, out / "effective_tokens.png")
    plot_gradient_effective_tokens(results, out / "gradient_effective_tokens.png")
    for i in range(min(plot_images, len(image_names))):
        plot_maps(results, i, out / f"maps_image{i}.png", image_names[i])
    return table
