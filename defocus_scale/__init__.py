"""defocus-scale: pretraining system for De-focus Attention Networks (arXiv 2406.04342).

Importing the package registers every model variant with timm's registry, so that
``timm.create_model("defocus_mamba_small")`` works once ``defocus_scale`` is imported.
"""

import os

# OpenMP threads sleep as soon as a parallel region ends instead of spinning. PyTorch's and numba's (the
# CPU selective scan's) OpenMP runtimes are two thread pools; one spinning after its region holds the
# cores the other one's next region needs. Measured on 2 cores: De-focus Mamba-S's CPU training step took
# 17.4 s spinning and 4.9 s passive (one thread; DeiT-S 2.9 s and 2.5 s). OpenMP reads this once, when
# torch is imported: it takes effect where defocus_scale is imported first (the CLI, the launchers'
# workers, which also get it in their environment); a value already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from defocus_scale.models import create_model, list_models, load_official_checkpoint  # noqa: E402

__all__ = ["create_model", "list_models", "load_official_checkpoint"]
__version__ = "0.1.0"
