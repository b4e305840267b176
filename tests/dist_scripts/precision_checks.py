"""Run under ``torchrun --nproc_per_node N`` (gloo, CPU): the bf16 FSDP2 plan of every De-focus family.

Prints one JSON line (rank 0) with, per family: the dtypes the bandpass operators received, the sharded-root
EMA check, and the errors of the bf16-trained model against a float64 copy at 197 and 577 tokens."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from defocus_scale.models import create_model, defocus_mamba, defocus_retnet, defocus_vit
from defocus_scale.train.ema import ShardedEMA
from defocus_scale.train.parallel import (
    all_reduce_replicated_grads,
    build_sharded_model,
    init_distributed,
    replicated_parameters,
)

TINY = {
    "defocus_mamba_tiny": dict(embed_dim=32, depth=2, inner_dim=64, dt_rank=4, group_size=16, patch_size=4),
    "defocus_vit_tiny": dict(embed_dim=32, depth=2, num_heads=2, patch_size=4),
    "defocus_retnet_tiny": dict(embed_dim=32, depth=2, num_heads=2, patch_size=4),
}
# tokens -> image side at patch 4: 14 x 14 + 1 = 197, 24 x 24 + 1 = 577
SIDES = {197: 56, 577: 96}


def record_operator_dtypes() -> list[dict[str, str]]:
    """Wrap the operators as the models call them; every call appends the dtypes it was given."""
    seen: list[dict[str, str]] = []

    def wrap(module, name, fields):
        original = getattr(module, name)

        def recording(*args, **kwargs):
            bound = dict(zip(fields, args)) | kwargs
            seen.append({k: str(v.dtype) for k, v in bound.items() if isinstance(v, torch.Tensor)})
            return original(*args, **kwargs)

        setattr(module, name, recording)

    wrap(defocus_mamba, "selective_scan", ("u", "delta", "A", "B", "C"))
    wrap(defocus_vit, "defocus_attention", ("q", "k", "v"))
    wrap(defocus_retnet, "retention_scan", ("q", "k", "v", "log_decay", "theta"))
    return seen


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius): one scale-free number per tensor."""
    return ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item()


def check_family(name: str, env, seen: list) -> dict:
    result: dict = {}
    for tokens, side in SIDES.items():
        kwargs = dict(TINY[name], img_size=side, num_classes=10)
        model = build_sharded_model(name, kwargs, env, precision="bf16", seed=3)
        model.train()
        torch.manual_seed(11)  # same images and loss weights on every rank
        images = torch.randn(2, 3, side, side)
        weights = torch.randn(2, 10, dtype=torch.float64)
        seen.clear()
        out = model.forward_train(images, drop_path_rate=0.0)
        loss = (out.logits.double() * weights).sum() + out.aux_logits.double().mean() * 10
        loss.backward()
        all_reduce_replicated_grads(replicated_parameters(model), env.world_size)  # as the trainer does
        if tokens == 197:
            result["operator_dtypes"] = seen[0]
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                 for n, p in model.named_parameters() if p.grad is not None}  # fmt: skip
        result.setdefault("replicated_fp32", sorted(
            n for n, p in model.named_parameters() if not isinstance(p, DTensor) and p.dtype == torch.float32
        ))  # fmt: skip
        reference = create_model(name, **kwargs).double().train()
        reference.load_state_dict({k: v.double() for k, v in full.items()}, strict=True)
        ref_out = reference.forward_train(images.double(), drop_path_rate=0.0)
        ref_loss = (ref_out.logits * weights).sum() + ref_out.aux_logits.mean() * 10
        ref_loss.backward()
        errors = {"logits": relative_error(out.logits, ref_out.logits),
                  "aux_logits": relative_error(out.aux_logits, ref_out.aux_logits)}  # fmt: skip
        for param_name, p in reference.named_parameters():
            errors[f"grad:{param_name}"] = relative_error(grads[param_name], p.grad)
        result[f"errors_{tokens}"] = errors
        if tokens == 197:
            result["ema_sharded_root"] = check_ema_root(model, images)
    return result


def check_ema_root(model, images: torch.Tensor) -> dict:
    """The EMA head says 3.0 for every class; inside swapped_in() the logits must say so too, even right
    after a no-grad forward (which leaves FSDP2's root unit gathered)."""
    ema = ShardedEMA(model, decay=0.5)
    for key, tensor in ema.shadow.items():
        if key.startswith("head."):
            tensor.to_local().fill_(3.0 if key.endswith("bias") else 0.0)
    model.eval()
    with torch.no_grad():
        live = model(images)  # leaves the root unit unsharded
        with ema.swapped_in():
            averaged = model(images)
        after = model(images)
    model.train()
    return {"ema_logits_min": averaged.min().item(), "ema_logits_max": averaged.max().item(),
            "live_restored": bool(torch.equal(after, live))}  # fmt: skip


def main() -> None:
    families = sys.argv[1:] or list(TINY)
    env = init_distributed("cpu")
    seen = record_operator_dtypes()
    report = {name: check_family(name, env, seen) for name in families}
    if env.rank == 0:
        print(json.dumps({"world_size": env.world_size, "families": report}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
