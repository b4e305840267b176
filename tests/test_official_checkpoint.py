"""Published-model equivalence: a checkpoint laid out like the released De-focus Mamba ones, with random
values, must give through ``load_official_checkpoint`` the logits of an independent, token-by-token
implementation of the published forward pass written here from the spec (quirks included)."""

from __future__ import annotations

import math

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


def spec_forward(sd, images, group, rope_scale, delta_scale):
    """The published forward pass, step by step, in float64, with a Python loop over tokens."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
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
