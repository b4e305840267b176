"""Rank 1 never joins rank 0's all-reduce: with ``init_distributed(timeout_s=3)`` rank 0 must fail within
seconds (it prints how long it waited) instead of waiting gloo's default 30 minutes."""

import sys
import time

import torch
import torch.distributed as dist

from defocus_scale.train.parallel import init_distributed

env = init_distributed("cpu", timeout_s=3)
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
