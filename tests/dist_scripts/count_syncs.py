"""Run the trainer (``python count_syncs.py OUT.json key=value ...`` under torchrun) while counting, per
step, the host syncs (``Tensor.item``/``tolist``/``__bool__``/``__float__``/``__int__``/``cpu``/``numpy``
on any tensor) and the ``torch.distributed`` calls made outside FSDP's own collectives, on the training
thread (an async checkpoint's writer thread is not the step's critical path). Rank 0 writes
``{"steps": {step: {"syncs": n, "collectives": n, "calls": [...]}}, "summary": ...}``."""

import json
import sys
import threading
import time
import traceback
from collections import Counter

import torch
import torch.distributed as dist

from defocus_scale.train import loop
from defocus_scale.train.config import load_train_config

counts: Counter = Counter()
calls: list[str] = []


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "defocus_scale" in f.filename]
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


def _counting(kind: str, name: str, original):
    def wrapper(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            counts[kind] += 1
            calls.append(f"{kind}:{name}@{_where()}")
        return original(*args, **kwargs)

    return wrapper


for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
    setattr(torch.Tensor, name, _counting("syncs", name, getattr(torch.Tensor, name)))
for name in ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list",
             "barrier", "gather_object", "scatter_object_list"):  # fmt: skip
    setattr(dist, name, _counting("collectives", name, getattr(dist, name)))


class CountingHooks:
    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}

    def on_resume(self, step: int, checkpoint: str | None) -> None:
        counts.clear()
        calls.clear()

    def on_step_end(self, step: int, *_loss: float) -> None:  # (older trainers passed the loss)
        self.steps[step] = {
            "syncs": counts["syncs"], "collectives": counts["collectives"], "calls": list(calls),
            "time": time.perf_counter(),  # the host's view: when the step was handed to the device
        }
        counts.clear()
        calls.clear()


out, overrides = sys.argv[1], sys.argv[2:]
hooks = CountingHooks()
summary = loop.train(load_train_config(overrides), hooks=hooks)
if dist.get_rank() == 0:
    with open(out, "w") as handle:
        json.dump({"steps": hooks.steps, "summary": {k: v for k, v in summary.items() if k != "compile"}},
                  handle, default=str)  # fmt: skip
dist.destroy_process_group()
