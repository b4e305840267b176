"""Published-model equivalence: a checkpoint laid out like the released De-focus Mamba ones, with random
values, must give through ``load_official_checkpoint`` the logits of an independent, token-by-token
implementation of the published forward pass written here from the spec (quirks included)."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from defocus_scale.models import CheckpointError, load_official_checkpoint

C, DEPTH, E, N, R, K, PATCH, CLASSES = 32, 2, 64, 16, 6, 4, 8, 7


def published_state_dict(mlp_heads: bool = False, aux: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "patch_embed.proj.weight": rand(C, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": rand(C),
        "cls_token": rand(1, 1, C),
        "norm.weight": 1 + rand(C),
        "norm.bias": rand(C),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({
            p + "norm.weight": 1 + rand(C),
            p + "mixer.in_proj.weight": rand(2 * E, C),
            p + "mixer.conv1d.weight": rand(E, 1, K),
            p + "mixer.conv1d.bias": rand(E),
            p + "mixer.x_proj.weight": rand(R + 2 * N, E),
            p + "mixer.dt_proj.weight": rand(E, R),
            p + "mixer.dt_proj.bias": rand(E) - 2.0,
            p + "mixer.A_log": torch.log(torch.arange(1, N + 1).float()).repeat(E, 1) + rand(E, N),
            p + "mixer.D": 1 + rand(E),
            p + "mixer.freq": torch.rand(N, generator=g),
            p + "mixer.out_proj.weight": rand(C, E),
        })  # fmt: skip
    for head in ("head", "head2") if aux else ("head",):
        if mlp_heads:
            sd.update({
                f"{head}.0.weight": rand(3 * C, C), f"{head}.0.bias": rand(3 * C),
                f"{head}.2.weight": rand(CLASSES, 3 * C), f"{head}.2.bias": rand(CLASSES),
            })  # fmt: skip
        else:
            sd.update({f"{head}.weight": rand(CLASSES, C), f"{head}.bias": rand(CLASSES)})
    return sd


def spec_forward(sd, images, group, rope_scale, delta_scale, quadrant=False):
    """The published forward pass, step by step, in float64, with a Python loop over tokens. ``quadrant``:
    the release's ``PatchEmbedChangeRes`` (``patch_embed_change_res``, ratio 2) token order."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    if quadrant:
        b, c, h, w = x.shape
        x = x.view(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, c)
    else:
        x = x.flatten(2).transpose(1, 2)
    x = torch.cat([x, sd["cls_token"].expand(x.shape[0], 1, C)], dim=1)
    batch, length, _ = x.shape
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * sd[p + "norm.weight"]
        xz = h @ sd[p + "mixer.in_proj.weight"].T
        xs, z = xz[..., :E], xz[..., E:]
        w, b = sd[p + "mixer.conv1d.weight"][:, 0], sd[p + "mixer.conv1d.bias"]
        conv = torch.zeros_like(xs)
        for t in range(length):
            acc = b.expand(batch, E).clone()
            for k in range(K):
                src = t - K + 1 + k
                if src >= 0:
                    acc = acc + w[:, k] * xs[:, src]
            conv[:, t] = acc
        xs = F.silu(conv)
        dbc = xs @ sd[p + "mixer.x_proj.weight"].T
        dt, Bm, Cm = dbc[..., :R], dbc[..., R : R + N], dbc[..., R + N :]

        def rotary(v, freq=sd[p + "mixer.freq"]):
            out = torch.empty_like(v)
            for t in range(length):
                for n in range(N):
                    angle = (t / rope_scale) * freq[n]  # each dim its own angle (the quirk)
                    partner = -v[:, t, n + 1] if n % 2 == 0 else v[:, t, n - 1]
                    out[:, t, n] = v[:, t, n] * math.cos(angle) + partner * math.sin(angle)
            return out

        Bm, Cm = rotary(Bm), rotary(Cm)
        delta = F.softplus(dt @ sd[p + "mixer.dt_proj.weight"].T + sd[p + "mixer.dt_proj.bias"]) / delta_scale
        A = -torch.exp(sd[p + "mixer.A_log"])
        state = torch.zeros(batch, E, N, dtype=torch.float64)
        y = torch.empty(batch, length, E, dtype=torch.float64)
        for t in range(length):
            decay = torch.exp(delta[:, t, :, None] * A)
            state = decay * state + delta[:, t, :, None] * Bm[:, t, None, :] * xs[:, t, :, None]
            y[:, t] = (state * Cm[:, t, None, :]).sum(-1)
        yg = y.view(batch, length, E // group, group)
        y = (yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + 1e-6)).view(batch, length, E)
        y = (y + xs * sd[p + "mixer.D"]) * F.silu(z)
        x = x + y @ sd[p + "mixer.out_proj.weight"].T
    x = F.layer_norm(x, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    cls = x[:, -1]
    if "head.weight" in sd:
        return cls @ sd["head.weight"].T + sd["head.bias"]
    hidden = torch.tanh(cls @ sd["head.0.weight"].T + sd["head.0.bias"])
    return hidden @ sd["head.2.weight"].T + sd["head.2.bias"]


@pytest.mark.parametrize(
    ("mlp_heads", "group", "rope_scale", "delta_scale"), [(False, 64, 1.0, 1.0), (True, 16, 4.0, 2.0)]
)
def test_published_logits(tmp_path, mlp_heads, group, rope_scale, delta_scale):
    sd = published_state_dict(mlp_heads=mlp_heads)
    path = tmp_path / "defocus_mamba_cls.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    images = torch.randn(2, 3, 32, 24)  # 4 x 3 patches: a non-square grid, raster order matters
    model = load_official_checkpoint(
        path, group_norm_size=group, rope_scale=rope_scale, delta_scale=delta_scale, img_size=32
    )
    assert not model.training
    expected = spec_forward(sd, images, group, rope_scale, delta_scale)
    got = model.double()(images.double())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_model_ema_entry_and_raw_state_dict():
    sd = published_state_dict(aux=False)
    other = published_state_dict(aux=False, seed=1)
    images = torch.randn(1, 3, 16, 16)
    raw = load_official_checkpoint(sd, img_size=16)
    ema = load_official_checkpoint({"model": other, "model_ema": sd}, img_size=16, use_ema=True)
    torch.testing.assert_close(raw(images), ema(images))
    assert raw.head2 is None


def test_unknown_and_missing_keys_are_named():
    sd = published_state_dict()
    sd["blocks.0.mixer.extra"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="blocks.0.mixer.extra"):
        load_official_checkpoint(sd)
    sd = published_state_dict()
    del sd["blocks.1.mixer.D"]
    with pytest.raises(CheckpointError, match="blocks.1.mixer.D"):
        load_official_checkpoint(sd)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "truncated.pth"
    good = tmp_path / "good.pth"
    torch.save({"model": published_state_dict()}, good)
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_official_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official_checkpoint(tmp_path / "missing.pth")


def save_release_checkpoint(path: Path, sd: dict, ema: dict | None = None, **config: object) -> None:
    """A checkpoint as the release's ``save_checkpoint_ema`` writes it: model, optimizer, lr scheduler,
    scaler, epoch, accuracies, model_ema and the yacs ``CfgNode`` config. yacs is not a dependency: a
    stand-in module named ``yacs.config`` is registered while saving, whose ``CfgNode`` pickles as yacs'
    does (a dict subclass: NEWOBJ, SETITEMS, then BUILD with yacs' ``__immutable__`` /
    ``__deprecated_keys__`` (a set) / ``__renamed_keys__`` / ``__new_allowed__`` state); it is gone again
    before anything loads the file."""

    class CfgNode(dict):
        def __init__(self, init: dict | None = None) -> None:
            super().__init__(init or {})
            self.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(),
                                  "__renamed_keys__": {}, "__new_allowed__": False})  # fmt: skip

    module = types.ModuleType("yacs.config")
    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = CfgNode
    package = types.ModuleType("yacs")
    package.config = module
    node = {
        "MODEL": {"TYPE": "mamba", "NAME": "defocus_mamba_large",
                  "head_type": config.get("head_type", "IN1k_cls"),
                  "use_aux_loss": True, "use_rope": True, "use_pos_embed": False, "drop_path_rate": 0.7,
                  "patch_embed_change_res": config.get("change_res", False),
                  "MAMBA": {"group_norm_size": config.get("group", 64), "intermediate_size": E,
                            "rope_scale_factor": config.get("rope_scale", 1.0),
                            "delta_scale_factor": config.get("delta_scale", 1.0), "time_step_rank": R}},
        "DATA": {"IMG_SIZE": config.get("img_size", 224), "INTERPOLATION": "bicubic", "BATCH_SIZE": 32},
        "TRAIN": {"OPTIMIZER": {"BETAS": (0.9, 0.999)}, "LR_SCHEDULER": {"MULTISTEPS": []}, "EPOCHS": 20},
        "AUG": {"AUTO_AUGMENT": None, "MIXUP": 0.8},
    }  # fmt: skip

    def cfg(value):
        return CfgNode({k: cfg(v) for k, v in value.items()}) if isinstance(value, dict) else value

    moments = {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3), "step": torch.tensor(10.0)}
    checkpoint = {
        "model": sd, "optimizer": {"state": {0: moments}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        "lr_scheduler": {"t_initial": 300, "base_values": [5e-4], "noise_range_t": None},
        "max_accuracy": 81.9, "scaler": {"scale": 65536.0, "_growth_tracker": 0}, "epoch": 299,
        "config": cfg(node), "model_ema": ema if ema is not None else sd, "max_accuray_ema": 82.0,
    }  # fmt: skip
    sys.modules.update({"yacs": package, "yacs.config": module})
    try:
        torch.save(checkpoint, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


def test_release_training_checkpoint_with_its_yacs_config(tmp_path):
    """The training script's file loads without yacs and without unpickling code; its config supplies
    group_norm_size, rope_scale, delta_scale and the image size."""
    sd, ema = published_state_dict(mlp_heads=True), published_state_dict(mlp_heads=True, seed=3)
    path = tmp_path / "ckpt_epoch_19.pth"
    save_release_checkpoint(path, sd, ema, group=16, rope_scale=4.0, delta_scale=2.0, img_size=32)
    assert "yacs" not in sys.modules
    images = torch.randn(2, 3, 32, 32)
    for use_ema, weights in ((False, sd), (True, ema)):
        model = load_official_checkpoint(path, use_ema=use_ema)
        assert model.img_size == 32 and model.blocks[0].mixer.rope_scale == 4.0
        expected = spec_forward(weights, images, 16, 4.0, 2.0)
        torch.testing.assert_close(model.double()(images.double()), expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(CheckpointError, match="rope_scale=1.0 contradicts"):
        load_official_checkpoint(path, rope_scale=1.0)


def test_release_quadrant_token_order(tmp_path):
    """patch_embed_change_res (quadrant order, same keys) is read from the config and reproduced; a model in
    raster order refuses the file instead of loading it wrong."""
    import timm

    sd = published_state_dict(aux=False)
    path = tmp_path / "change_res.pth"
    save_release_checkpoint(path, sd, change_res=True, group=16, img_size=32)
    images = torch.randn(2, 3, 32, 32)
    model = load_official_checkpoint(path)
    assert model.token_order == "quadrant"
    expected = spec_forward(sd, images, 16, 1.0, 1.0, quadrant=True)
    torch.testing.assert_close(model.double()(images.double()), expected, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(expected, spec_forward(sd, images, 16, 1.0, 1.0))  # the order matters
    arch = dict(embed_dim=C, depth=DEPTH, inner_dim=E, dt_rank=R, patch_size=PATCH, num_classes=CLASSES,
                group_size=16, aux_head="none", img_size=32)  # fmt: skip
    overlay = dict(file=str(path))
    with pytest.raises(CheckpointError, match="token_order='quadrant'"):
        timm.create_model("defocus_mamba_small", pretrained=True, pretrained_cfg_overlay=overlay, **arch)
    loaded = timm.create_model("defocus_mamba_small", pretrained=True, pretrained_cfg_overlay=overlay,
                               token_order="quadrant", **arch).eval()  # fmt: skip
    torch.testing.assert_close(loaded.double()(images.double()), expected, rtol=1e-9, atol=1e-9)


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "hostile.pth"
    torch.save({"model": published_state_dict(), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"asks the unpickler for builtins\.getattr, which is refused"):
        load_official_checkpoint(path)
    assert not marker.exists()
