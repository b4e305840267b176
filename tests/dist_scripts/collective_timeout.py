"""Rank 1 never joins rank 0's all-reduce: rank 0 must fail within seconds (it prints how long it waited)
instead of waiting gloo's default 30 minutes. ``init``: the group is created with ``timeout_s=3``;
``after-first-step``: created with 60 s, one collective completes, then ``set_collective_timeout`` gives
the default and the mesh's groups 3 s (what the trainer does after its first step)."""

import sys
import time

import torch
import torch.distributed as dist

from defocus_scale.train.parallel import init_distributed, set_collective_timeout

mode = sys.argv[1] if len(sys.argv) > 1 else "init"
env = init_distributed("cpu", timeout_s=3 if mode == "init" else 60)
if mode == "after-first-step":
    dist.all_reduce(torch.ones(1))
    set_collective_timeout(env.mesh, 3)
if env.rank == 1:
    time.sleep(12)
    sys.exit(0)
start = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except RuntimeError as exc:
    print(f"TIMED OUT after {time.monotonic() - start:.1f} s: {type(exc).__name__}", flush=True)
    sys.exit(0)
print("NO TIMEOUT", flush=True)
sys.exit(1)
