"""Over-focus diagnostics: mixing matrices reproduce each operator, gradient maps, the analyze CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from defocus_scale.analysis import cli as analyze_cli
from defocus_scale.analysis.diagnostics import diagnose, distribution_summary, token_influence
from defocus_scale.analysis.mixing import (
    attention_mixing_matrix,
    layer_mixing,
    mamba_scan_inputs,
    retention_mixing_matrix,
    selective_scan_mixing_matrix,
)
from defocus_scale.kernels import defocus_attention, retention_scan, selective_scan
from defocus_scale.kernels.selective.naive import mamba_epilogue
from defocus_scale.models import create_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
F64 = torch.float64
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_classes=10)
TINY_BY_FAMILY = {
    "defocus_vit_tiny": dict(num_heads=2),
    "causal_vit_tiny": dict(num_heads=2),
    "deit_tiny": dict(num_heads=2),
    "defocus_retnet_tiny": dict(num_heads=2),
    "retnet_tiny": dict(num_heads=2),
    "defocus_mamba_tiny": dict(dt_rank=4, group_size=32),
    "mamba_tiny": dict(dt_rank=4),
}


def tiny_model(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **TINY, **TINY_BY_FAMILY[name]).to(dtype).eval()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("decay_mode", ["multiplicative", "additive"])
@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_attention_matrix_reproduces_operator(causal, decay_mode, backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 11, 3, 8, dtype=F64) for _ in range(3))
    lambda_hat, theta = torch.randn(3, dtype=F64), torch.rand(3, 4, dtype=F64)
    matrix = attention_mixing_matrix(q, k, lambda_hat, theta, causal, decay_mode)
    expected = defocus_attention(q, k, v, lambda_hat, theta, causal, decay_mode, backend=backend)
    torch.testing.assert_close(torch.einsum("bhts,bshd->bthd", matrix, v), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(matrix.sum(-1), torch.ones(2, 3, 11, dtype=F64))
    if causal:
        assert matrix.triu(1).abs().max() == 0


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("rotary", [True, False])
def test_retention_matrix_reproduces_operator(backend, rotary):
    torch.manual_seed(1)
    q, k = torch.randn(2, 70, 2, 6, dtype=F64), torch.randn(2, 70, 2, 6, dtype=F64)  # > one 64-token chunk
    v = torch.randn(2, 70, 2, 5, dtype=F64)
    log_decay, theta = -torch.rand(2, dtype=F64) * 0.3, (torch.rand(2, 3, dtype=F64) if rotary else None)
    matrix = retention_mixing_matrix(q, k, log_decay, theta)
    expected = retention_scan(q, k, v, log_decay, theta, backend=backend)
    torch.testing.assert_close(torch.einsum("bhts,bshd->bthd", matrix, v), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("with_rotary_and_skip", [True, False])
def test_selective_scan_matrix_reproduces_operator(backend, with_rotary_and_skip):
    torch.manual_seed(2)
    batch, length, channels, state = 2, 13, 6, 4
    u, B, C = torch.randn(batch, length, channels, dtype=F64), *(torch.randn(batch, length, state, dtype=F64)
                                                                  for _ in range(2))  # fmt: skip
    delta = torch.rand(batch, length, channels, dtype=F64) + 0.05
    A = -torch.rand(channels, state, dtype=F64) * 2
    freq = torch.rand(state, dtype=F64) if with_rotary_and_skip else None
    D = torch.randn(channels, dtype=F64) if with_rotary_and_skip else None
    matrix = selective_scan_mixing_matrix(delta, A, B, C, freq, 2.0, D)
    expected = selective_scan(u, delta, A, B, C, freq, 2.0, D=D, backend=backend)
    torch.testing.assert_close(torch.einsum("bets,bse->bte", matrix, u), expected, rtol=1e-10, atol=1e-12)
    assert matrix.triu(1).abs().max() == 0


@pytest.mark.parametrize("name", ["defocus_vit_tiny", "deit_tiny", "defocus_retnet_tiny", "retnet_tiny",
                                  "defocus_mamba_tiny", "mamba_tiny"])  # fmt: skip
def test_layer_mixing_reproduces_the_mixer(name):
    """The matrix built from a layer's input, applied to its values, gives the mixer's own output."""
    model = tiny_model(name, F64)
    mixer = model.blocks[1].mixer
    hidden = torch.randn(2, 17, 32, dtype=F64)
    mixing = layer_mixing(mixer, hidden)
    mixed = mixing.mix().transpose(1, 2)  # (b, L, groups, dim)
    if "mamba" in name:
        inputs = mamba_scan_inputs(mixer, hidden)
        y = mamba_epilogue(mixed.squeeze(-1), inputs["u"], mixer.D, inputs["z"], mixer.group_size)
        rebuilt = mixer.out_proj(y)
    elif "retnet" in name:
        normed = torch.nn.functional.rms_norm(mixed, (mixer.head_dim,), eps=1e-6).flatten(2)
        rebuilt = mixer.out_proj(torch.nn.functional.silu(mixer.g_proj(hidden)) * normed)
    else:
        rebuilt = mixer.proj(mixed.flatten(2))
    torch.testing.assert_close(rebuilt, mixer(hidden), rtol=1e-9, atol=1e-11)


def test_distribution_summary_extremes():
    length = 8
    uniform = distribution_summary(torch.ones(1, length, length), torch.arange(length))
    torch.testing.assert_close(uniform["effective_tokens"], torch.full((1, length), float(length), dtype=F64))
    one_hot = distribution_summary(torch.eye(length)[None], torch.arange(length))
    torch.testing.assert_close(one_hot["effective_tokens"], torch.ones(1, length, dtype=F64))
    torch.testing.assert_close(one_hot["mean_distance"], torch.zeros(1, length, dtype=F64))


@pytest.mark.parametrize("name", ["defocus_mamba_tiny", "causal_vit_tiny", "deit_tiny"])
def test_token_influence_matches_direct_gradient_and_causality(name):
    model = tiny_model(name, F64)
    block, hidden = model.blocks[0], torch.randn(1, 17, 32, dtype=F64)
    influence = token_influence(block, hidden, query_chunk=5)
    for query in (3, 16):
        x = hidden.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(block(x)[0, query].norm(), x)
        torch.testing.assert_close(influence[0, query], grad[0].norm(dim=-1))
    future = influence[0].triu(1).abs().max()
    assert (future == 0) if name != "deit_tiny" else (future > 0)


def test_diagnose_shapes_and_ranges():
    model = tiny_model("defocus_vit_tiny")
    images = torch.randn(2, 3, 32, 32)
    layers = diagnose(model, images, gradient_layers=[1])
    assert [d.layer for d in layers] == [0, 1] and layers[0].attention_map is None
    deep = layers[1]
    assert (
        deep.attention_map.shape == (2, 17, 17)
        and deep.attention_map.diagonal(dim1=1, dim2=2).abs().max() == 0
    )
    assert deep.attention_map.amax((1, 2)).allclose(torch.ones(2))
    assert deep.receptive_field.shape == deep.loss_gradient.shape == (2, 17)
    for query in ("class", "patch"):
        tokens = deep.mixing_summary[query]["effective_tokens"]
        assert tokens.shape == (2,) and bool(((tokens >= 1) & (tokens <= 17)).all())
    with pytest.raises(ValueError, match="out of range"):
        diagnose(model, images, gradient_layers=[2])


def run_analyze(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    analyze_cli.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", *argv])
    return args.func(args)


def tiny_args(*models: str) -> list[str]:
    args = [f"--model-arg={key}={value}" for key, value in TINY.items()]
    for model in models:
        args += [f"--model-arg={model}:{key}={value}" for key, value in TINY_BY_FAMILY[model].items()]
    return args


def test_analyze_cli_end_to_end_synthetic(tmp_path):
    models = ["causal_vit_tiny", "defocus_vit_tiny", "mamba_tiny", "defocus_mamba_tiny"]
    out = tmp_path / "out"
    code = run_analyze([*models, "--images", "synthetic", "--out", str(out), "--num-images", "2",
                        "--layers", "0", "-1", *tiny_args(*models)])  # fmt: skip
    assert code == 0
    table = pq.read_table(out / "overfocus.parquet").to_pylist()
    assert {row["model"] for row in table} == set(models)
    # 2 layers x 2 images x (class, patch) mixing rows + 2 gradient layers x 2 images x (class, patch, loss)
    assert len(table) == len(models) * (2 * 2 * 2 + 2 * 2 * 3)
    assert {row["source"] for row in table} == {"mixing", "gradient_attention", "loss_gradient"}
    assert all(row["effective_tokens"] >= 1 - 1e-9 for row in table)
    for name in (
        "effective_tokens.png",
        "gradient_effective_tokens.png",
        "maps_image0.png",
        "maps_image1.png",
    ):
        assert (out / name).stat().st_size > 5000


@pytest.mark.skipif(not (DATA / "hymenoptera").is_dir(), reason="shared real data not present")
def test_analyze_cli_on_real_images(tmp_path):
    models = ["retnet_tiny", "defocus_retnet_tiny"]
    code = run_analyze([*models, "--images", str(DATA / "hymenoptera" / "val"), "--out", str(tmp_path),
                        "--num-images", "1", *tiny_args(*models)])  # fmt: skip
    assert code == 0
    images = {row["image"] for row in pq.read_table(tmp_path / "overfocus.parquet").to_pylist()}
    assert len(images) == 1 and next(iter(images)).endswith(".jpg")


def test_analyze_cli_input_errors(tmp_path):
    with pytest.raises(analyze_cli.AnalysisInputError, match="no_such_model"):
        run_analyze(["no_such_model", "--images", "synthetic", "--out", str(tmp_path)])
    with pytest.raises(analyze_cli.AnalysisInputError, match="missing.safetensors"):
        run_analyze([str(tmp_path / "missing.safetensors"), "--images", "synthetic", "--out", str(tmp_path)])
    with pytest.raises(analyze_cli.AnalysisInputError, match="not among the models"):
        run_analyze(
            ["deit_tiny", "--model-arg", "other:depth=2", "--images", "synthetic", "--out", str(tmp_path)]
        )
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(analyze_cli.AnalysisInputError, match="no decodable images"):
        run_analyze(["deit_tiny", *tiny_args("deit_tiny"), "--images", str(tmp_path / "images"),
                     "--out", str(tmp_path)])  # fmt: skip


def write_export(path: Path, name: str) -> torch.nn.Module:
    """A file in the trainer's export layout (weights + the variant and its arguments as metadata)."""
    import json

    from safetensors.torch import save_file

    from defocus_scale.train.export import FORMAT

    model = tiny_model(name)
    overrides = {**TINY, **TINY_BY_FAMILY[name]}
    metadata = {"format": FORMAT, "model": name, "overrides": json.dumps(overrides), "weights": "live"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return model


def test_analyze_cli_on_exported_checkpoints_of_non_default_size(tmp_path):
    # A 32 px, 2-block export: analyze rebuilds it from the file alone and names the variant's family.
    names = ["causal_vit_tiny", "defocus_mamba_tiny"]
    paths = [tmp_path / f"{name}_run.safetensors" for name in names]
    originals = [write_export(path, name) for path, name in zip(paths, names)]
    subject = analyze_cli.load_subject(str(paths[0]), {}, seed=0)
    assert subject.label == "causal_vit_tiny_run" and subject.family == "causal_vit"
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(subject.model(images), originals[0](images))
    out = tmp_path / "out"
    argv = [*map(str, paths), "--images", "synthetic", "--out", str(out), "--num-images", "1"]
    assert run_analyze(argv) == 0
    rows = pq.read_table(out / "overfocus.parquet").to_pylist()
    assert {(row["model"], row["family"], row["depth"]) for row in rows} == {
        ("causal_vit_tiny_run", "causal_vit", 2),
        ("defocus_mamba_tiny_run", "defocus_mamba", 2),
    }
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(analyze_cli.AnalysisInputError, match="corrupt.safetensors"):
        analyze_cli.load_subject(str(tmp_path / "corrupt.safetensors"), {}, seed=0)
    with pytest.raises(analyze_cli.AnalysisInputError, match="bad --model-arg"):
        analyze_cli.load_subject(str(paths[0]), {"no_such_argument": 1}, seed=0)


def test_find_images_per_class_takes_classes_in_turn(tmp_path):
    from PIL import Image

    for folder, count in (("a", 3), ("b", 1), ("c", 2)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "c" / "0.png").write_bytes(b"broken")  # skipped; the class's next image stands in
    _, names = analyze_cli.find_images(tmp_path, 2, per_class=True)
    assert names == ["a/0.png", "b/0.png", "c/1.png", "a/1.png"]
    _, names = analyze_cli.find_images(tmp_path, 2)
    assert names == ["a/0.png", "a/1.png"]
    with pytest.raises(analyze_cli.AnalysisInputError, match="no class subfolders"):
        analyze_cli.find_images(tmp_path / "a", 1, per_class=True)
