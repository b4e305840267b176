"""Model zoo: parameter counts, registries, meta-device construction, causality, outputs, drop path."""

from __future__ import annotations

import pytest
import timm
import torch

import defocus_scale  # noqa: F401  (registers the timm entry points)
from defocus_scale.models import ModelOutput, create_model, list_models
from defocus_scale.models.trunk import drop_path_rates

FAMILIES = ["defocus_mamba", "defocus_retnet", "defocus_vit", "causal_vit", "deit", "mamba", "retnet"]
SIZES = ["tiny", "small", "base", "large", "1b", "3b"]
CAUSAL = ["defocus_mamba", "defocus_retnet", "defocus_vit", "causal_vit", "mamba", "retnet"]

# A CPU-sized version of each family: 16px images, 4px patches -> 16 patches + the class token.
TINY = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, backend="torch")
FAMILY_TINY = {
    "defocus_mamba": dict(inner_dim=64, dt_rank=4, group_size=16),
    "mamba": dict(inner_dim=64, dt_rank=4),
    "defocus_retnet": dict(num_heads=2),
    "retnet": dict(num_heads=2),
    "defocus_vit": dict(num_heads=2),
    "causal_vit": dict(num_heads=2),
    "deit": dict(num_heads=2),
}


def tiny(family: str, **overrides):
    return create_model(f"{family}_tiny", **{**TINY, **FAMILY_TINY[family], **overrides})


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The paper's reported sizes (ImageNet-1k heads). Within 2%.
PAPER_PARAMS = {
    "defocus_mamba_small": 25.1e6,
    "defocus_mamba_base": 92.7e6,
    "defocus_mamba_large": 330.1e6,
    "defocus_vit_small": 22.4e6,
    "defocus_vit_base": 87.4e6,
    "defocus_retnet_base": 92.7e6,
    "mamba_small": 24.7e6,
    "mamba_base": 91.9e6,
    "deit_small": 22.1e6,
    "deit_base": 86.6e6,
    "retnet_base": 93.6e6,
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    with torch.device("meta"):
        model = create_model(name)
    assert count(model) == pytest.approx(PAPER_PARAMS[name], rel=0.02)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("size", "target"), [("1b", 1.0e9), ("3b", 3.0e9)])
def test_billion_parameter_sizes(family, size, target):
    with torch.device("meta"):
        model = create_model(f"{family}_{size}")
    assert count(model) == pytest.approx(target, rel=0.05)
    assert all(p.is_meta for p in model.parameters())  # no memory was allocated


def test_every_variant_is_registered_here_and_in_timm():
    expected = {f"{family}_{size}" for family in FAMILIES for size in SIZES}
    assert set(list_models()) == expected
    assert expected <= set(timm.list_models())
    model = timm.create_model("defocus_vit_tiny", **TINY, num_heads=2)
    assert type(model).__name__ == "DefocusViT" and model.num_classes == 5
    with pytest.raises(ValueError, match="unknown model"):
        create_model("defocus_mamba_huge")


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_construction_then_init_matches_eager_init(family):
    torch.manual_seed(0)
    eager = tiny(family)
    with torch.device("meta"):
        meta = tiny(family)
    meta.to_empty(device="cpu")
    meta.init_weights()
    eager_state = eager.state_dict()
    for name, tensor in meta.state_dict().items():
        assert torch.isfinite(tensor).all(), name
        reference = eager_state[name]
        deterministic = name.endswith(("A_log", "theta")) or (tensor.ndim < 2 and "conv1d" not in name)
        if not deterministic:
            # random matrices: same distribution, not the same draw
            assert tensor.std().item() == pytest.approx(reference.std().item(), rel=0.5, abs=1e-3), name
        else:
            # deterministic values: norms, biases, decays, frequencies, dt biases, D, A_log
            torch.testing.assert_close(tensor, reference, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_in_train_and_eval_mode(family):
    model = tiny(family)
    images = torch.randn(3, 3, 16, 16)
    model.eval()
    logits = model(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 5)
    feats = model.forward_features(images)
    assert feats.shape == (3, 17, 32)
    torch.testing.assert_close(model.head(feats[:, -1]), logits)
    model.train()
    train_logits = model(images)  # timm's contract: forward gives logits in training mode too
    assert isinstance(train_logits, torch.Tensor) and train_logits.shape == (3, 5)
    out = model.forward_train(images, drop_path_rate=0.0)
    assert isinstance(out, ModelOutput)
    torch.testing.assert_close(out.logits, logits)  # no dropout anywhere else
    torch.testing.assert_close(train_logits, logits)
    if family.startswith("defocus"):
        assert out.aux_logits.shape == (3, 16, 5)  # released per-token aux head
    else:
        assert out.aux_logits is None


def test_pooled_aux_head():
    model = tiny("defocus_mamba", aux_head="pooled").train()
    out = model.forward_train(torch.randn(2, 3, 16, 16))
    assert out.aux_logits.shape == (2, 5)


@pytest.mark.parametrize("family", CAUSAL)
def test_causality(family):
    """Changing the patches after position t changes nothing at positions <= t."""
    torch.manual_seed(0)
    model = tiny(family).eval().double()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    before = model.forward_features(images)
    t = 6  # patch index 6 = row 1, column 2 of the 4x4 grid; patches 7..15 and the class token follow
    changed = images.clone()
    changed[:, :, 4:8, 12:16] += 1.0  # patch 7
    changed[:, :, 8:, :] += torch.randn(2, 3, 8, 16, dtype=torch.float64)  # patches 8..15
    after = model.forward_features(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-12)
    assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().amax() > 1e-3


def test_deit_is_not_causal():
    model = tiny("deit").eval().double()
    images = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    changed = images.clone()
    changed[:, :, 12:, 12:] += 1.0  # the last patch
    delta = model.forward_features(changed) - model.forward_features(images)
    assert delta[:, 0].abs().amax() > 1e-6


def test_drop_path_rate_per_call():
    assert drop_path_rates(0.6, 4) == pytest.approx([0.0, 0.2, 0.4, 0.6])
    model = tiny("defocus_mamba", depth=4).train()
    images = torch.randn(8, 3, 16, 16)
    torch.manual_seed(1)
    a = model.forward_train(images, drop_path_rate=0.0).logits
    torch.manual_seed(1)
    b = model.forward_train(images, drop_path_rate=0.9).logits
    assert not torch.allclose(a, b)
    rates = [block.drop_path.rate.item() for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.3, 0.6, 0.9])  # held by the blocks until changed
    torch.manual_seed(1)
    torch.testing.assert_close(model(images), b)  # forward(x) uses the blocks' current rates
    model.eval()  # eval ignores the rate
    torch.testing.assert_close(model.forward_train(images, drop_path_rate=0.9).logits, model(images))


def test_bandpass_parameters_are_learnable_only_in_defocus_variants():
    names = {n for n, _ in tiny("defocus_vit").named_parameters()}
    assert any(n.endswith("lambda_hat") for n in names) and any(n.endswith("theta") for n in names)
    retnet = tiny("retnet")
    assert not any(n.endswith(("lambda_hat", "theta")) for n, _ in retnet.named_parameters())
    assert any(n.endswith("lambda_hat") for n, _ in retnet.named_buffers())  # fixed RetNet decays
    assert not any(n.endswith("freq") for n, _ in tiny("mamba").named_parameters())
    # every head gets its own decay, spread over a range
    decays = tiny("defocus_retnet").blocks[0].mixer.bandpass.log_decay()
    assert decays.unique().numel() == decays.numel() and (decays < 0).all()


def test_gradients_reach_the_bandpass_parameters():
    for family in ("defocus_mamba", "defocus_retnet", "defocus_vit"):
        model = tiny(family).train()
        out = model.forward_train(torch.randn(2, 3, 16, 16))
        (out.logits.sum() + out.aux_logits.sum()).backward()
        for name, p in model.named_parameters():
            if name.endswith(("freq", "lambda_hat", "theta", "A_log")):
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{family}: {name}"


# -- timm-native API ------------------------------------------------------------------------------


def test_pretrained_cfgs_and_the_data_config_follow_the_model():
    from timm.data import resolve_data_config

    with torch.device("meta"):
        deit, mamba = timm.create_model("deit_tiny"), timm.create_model("defocus_mamba_tiny", img_size=384)
        large = timm.create_model("defocus_mamba_large")
    assert deit.pretrained_cfg["classifier"] == "head" and deit.pretrained_cfg["fixed_input_size"]
    assert deit.pretrained_cfg["first_conv"] == "patch_embed.proj"
    assert mamba.pretrained_cfg["classifier"] == ("head", "head2")
    assert large.pretrained_cfg["classifier"] == ("head.2", "head2.2")  # the released Large's MLP heads
    config = resolve_data_config(model=mamba)
    assert config["input_size"] == (3, 384, 384) and config["crop_pct"] == 0.875
    assert config["interpolation"] == "bicubic" and config["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    with pytest.raises(TypeError):  # unknown arguments are not swallowed
        timm.create_model("defocus_vit_tiny", not_an_argument=1)


def test_local_weights_through_pretrained_true_and_checkpoint_path(tmp_path):
    from safetensors.torch import save_file

    from defocus_scale.train.export import write_export

    source = tiny("defocus_vit").eval()
    weights = source.state_dict()
    write_export(
        tmp_path / "export.safetensors", weights, "defocus_vit_tiny", {**TINY, **FAMILY_TINY["defocus_vit"]}
    )
    save_file(weights, tmp_path / "plain.safetensors")
    images = torch.randn(2, 3, 16, 16)
    kwargs = {**TINY, **FAMILY_TINY["defocus_vit"]}
    for path in ("export.safetensors", "plain.safetensors"):
        overlay = dict(file=str(tmp_path / path))
        loaded = timm.create_model(
            "defocus_vit_tiny", pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
        )
        torch.testing.assert_close(loaded.eval()(images), source(images))
        from_path = timm.create_model("defocus_vit_tiny", checkpoint_path=str(tmp_path / path), **kwargs)
        torch.testing.assert_close(from_path.eval()(images), source(images))
    # Another class count and one input channel, as timm adapts its own weights: fresh heads, summed conv.
    overlay = dict(file=str(tmp_path / "plain.safetensors"))
    adapted = timm.create_model("defocus_vit_tiny", pretrained=True, pretrained_cfg_overlay=overlay,
                                **{**kwargs, "num_classes": 3, "in_chans": 1})  # fmt: skip
    assert adapted.head.out_features == 3 and adapted.patch_embed.proj.in_channels == 1
    torch.testing.assert_close(
        adapted.patch_embed.proj.weight, weights["patch_embed.proj.weight"].sum(1, True)
    )
    torch.testing.assert_close(adapted.blocks[1].mlp.fc1.weight, weights["blocks.1.mlp.fc1.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_train_loss_reaches_every_parameter(family):
    """The counterpart of timm's backward test for the aux head, which only forward_train reads."""
    from defocus_scale.losses import defocus_loss

    model = tiny(family).train()
    defocus_loss(model.forward_train(torch.randn(2, 3, 16, 16)), torch.tensor([1, 3])).total.backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_features_and_intermediates_of_the_causal_sequence():
    model = tiny("defocus_mamba", depth=4).eval()
    images = torch.randn(2, 3, 16, 20)  # a 4 x 5 grid
    final, taps = model.forward_intermediates(images, output_fmt="NLC", return_prefix_tokens=True)
    torch.testing.assert_close(final, model.forward_features(images))
    assert len(taps) == 4 and taps[0][0].shape == (2, 20, 32) and taps[0][1].shape == (2, 1, 32)
    grid = model.forward_intermediates(images, indices=[1], intermediates_only=True)[0]
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), taps[1][0])  # raster order on the grid
    features = timm.create_model("defocus_mamba_tiny", features_only=True, out_indices=(1, 3),
                                 **{**TINY, **FAMILY_TINY["defocus_mamba"], "depth": 4})  # fmt: skip
    assert features.feature_info.channels() == [32, 32] and features.feature_info.reduction() == [4, 4]
    assert [tuple(f.shape) for f in features(images)] == [(2, 32, 4, 5), (2, 32, 4, 5)]


def test_quadrant_token_order_is_the_releases():
    from defocus_scale.models.trunk import grid_to_tokens, tokens_to_grid

    x = torch.randn(2, 8, 4, 6)  # the release's PatchEmbedChangeRes, ratio 2
    expected = x.view(2, 8, 2, 2, 2, 3).permute(0, 2, 4, 3, 5, 1).reshape(2, -1, 8)
    torch.testing.assert_close(grid_to_tokens(x, "quadrant"), expected)
    torch.testing.assert_close(tokens_to_grid(expected, 4, 6, "quadrant"), x)
    model = tiny("defocus_mamba", token_order="quadrant").eval()
    with pytest.raises(ValueError, match="raster order only"):
        tiny("deit", token_order="quadrant")
    grid = model.forward_intermediates(torch.randn(1, 3, 16, 16), intermediates_only=True)[-1]
    assert grid.shape == (1, 32, 4, 4)


@pytest.mark.parametrize("family", ["causal_vit", "deit"])
def test_position_embedding_resampled_for_other_sizes(family):
    model = tiny(family).eval()
    with pytest.raises(AssertionError, match=r"Input height \(24\) doesn't match model \(16\)"):
        model(torch.randn(1, 3, 24, 24))
    dynamic = tiny(family, dynamic_img_size=True).eval()
    dynamic.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(dynamic(images), model(images))  # its own grid: unchanged
    assert dynamic(torch.randn(2, 3, 24, 32)).shape == (2, 5)
    class_entry = model.pos_embed[:, -1].clone()
    model.set_input_size(img_size=32)
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 32) and model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    torch.testing.assert_close(model.pos_embed[:, -1], class_entry)  # the class token's entry, last, kept
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 32, 32)


def test_torchscript_and_fx():
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor

    images = torch.randn(2, 3, 16, 16)
    deit = tiny("deit").eval()
    torch.testing.assert_close(torch.jit.script(deit)(images), deit(images))
    with pytest.raises(RuntimeError, match="DefocusMambaMixer cannot be compiled by TorchScript"):
        torch.jit.script(tiny("defocus_mamba"))
    for family in ("defocus_mamba", "defocus_retnet", "defocus_vit"):
        model = tiny(family).eval()
        traced = create_feature_extractor(
            model, return_nodes=["head"],
            tracer_kwargs=dict(
                leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions()
            ),
        )  # fmt: skip
        torch.testing.assert_close(traced(images)["head"], model(images))


def test_classifier_api():
    model = tiny("defocus_retnet")
    head, aux = model.get_classifier()
    assert head is model.head and aux is model.head2
    model.reset_classifier(0)
    assert model.head2 is None and model(torch.randn(1, 3, 16, 16)).shape == (1, 32)
    model.reset_classifier(7, "avg")
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 7) and model.head2.out_features == 7
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(7, "max")
    assert (
        "cls_token" in model.no_weight_decay() and "blocks.0.mixer.bandpass.theta" in model.no_weight_decay()
    )
