"""defocus-scale: pretraining system for De-focus Attention Networks (arXiv 2406.04342).

Importing the package registers every model variant with timm's registry, so that
``timm.create_model("defocus_mamba_small")`` works once ``defocus_scale`` is imported.
"""

import os

# OpenMP threads spin only briefly after a parallel region (10,000 turns of libgomp's wait loop, tens of
# microseconds), then sleep. PyTorch's and numba's (the CPU selective scan's) OpenMP runtimes are two
# thread pools, and data-loading processes share the cores: a pool spinning for its default time holds
# cores that the other pool or process needs. Train step on 2 cores, batch 8 at 224 px (DeiT-S / De-focus
# Mamba-S seconds; "loaded": a busy process on one core): default spin 1.32 / 2.14 quiet, 3.68 / 6.42
# loaded; this 1.42 / 2.07 quiet, 2.89 / 5.08 loaded; OMP_WAIT_POLICY=PASSIVE 1.63 / 2.52 quiet, 2.58 /
# 4.02 loaded. OpenMP reads it once, when torch is imported: it takes effect where defocus_scale is
# imported first (the CLI, the launchers' workers, which also get it in their environment). A user's
# GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from defocus_scale.models import create_model, list_models, load_official_checkpoint  # noqa: E402

__all__ = ["create_model", "list_models", "load_official_checkpoint"]
__version__ = "0.1.0"
