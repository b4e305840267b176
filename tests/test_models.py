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
    out = model(images, drop_path_rate=0.0)
    assert isinstance(out, ModelOutput)
    torch.testing.assert_close(out.logits, logits)  # no dropout anywhere else
    if family.startswith("defocus"):
        assert out.aux_logits.shape == (3, 16, 5)  # released per-token aux head
    else:
        assert out.aux_logits is None


def test_pooled_aux_head():
    model = tiny("defocus_mamba", aux_head="pooled").train()
    out = model(torch.randn(2, 3, 16, 16))
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
    a = model(images, drop_path_rate=0.0).logits
    torch.manual_seed(1)
    b = model(images, drop_path_rate=0.9).logits
    assert not torch.allclose(a, b)
    model.eval()  # eval ignores the rate
    torch.testing.assert_close(model(images, drop_path_rate=0.9), model(images))


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
        out = model(torch.randn(2, 3, 16, 16))
        (out.logits.sum() + out.aux_logits.sum()).backward()
        for name, p in model.named_parameters():
            if name.endswith(("freq", "lambda_hat", "theta", "A_log")):
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{family}: {name}"
