"""Two gloo ranks run the start-of-run shared-storage check four ways and print one line each: a shared
local directory (passes, leaves no probe behind); ``memory://`` (each process has its own in-memory
filesystem, like a node-local disk per node: every rank must fail, naming rank 1); a data path that no
rank finds (passes: the loader's own error names it); and a data folder missing on rank 1's "node" only
(its os.path.exists is made to say so). The lines go to ``<folder>/outcome-<rank>.txt`` (two processes'
prints interleave on one pipe)."""

import os
import sys

import torch.distributed as dist

from defocus_scale.train.config import ConfigError
from defocus_scale.train.preflight import check_shared_storage

dist.init_process_group("gloo")
rank = dist.get_rank()
shared = sys.argv[1]
outcome = open(os.path.join(shared, f"outcome-{rank}.txt"), "w")  # noqa: SIM115


def attempt(name: str, run_dir: str, sources: dict) -> None:
    try:
        check_shared_storage(run_dir, sources, rank=rank)
        dist.barrier()  # rank 0 removes the probe once every rank has read it
        left = [n for n in os.listdir(shared) if "probe" in n]
        print(f"rank {rank} {name}: ok, probes left {left}", file=outcome, flush=True)
    except ConfigError as exc:
        print(f"rank {rank} {name}: ConfigError {exc}", file=outcome, flush=True)


attempt("shared", shared, {"data.source": shared})
attempt("memory", "memory://run", {})
attempt("nowhere", shared, {"data.source": f"{shared}/misspelt"})  # on no rank: the loader's error to give
if rank == 1:
    os.path.exists = lambda path: False
attempt("data", shared, {"data.source": f"{shared}/shards-{{000..003}}.tar"})
dist.destroy_process_group()
