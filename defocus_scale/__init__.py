"""defocus-scale: pretraining system for De-focus Attention Networks (arXiv 2406.04342).

Importing the package registers every model variant with timm's registry, so that
``timm.create_model("defocus_mamba_small")`` works once ``defocus_scale`` is imported.
"""

from defocus_scale.models import create_model, list_models, load_official_checkpoint

__all__ = ["create_model", "list_models", "load_official_checkpoint"]
__version__ = "0.1.0"
