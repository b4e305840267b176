"""Model zoo: De-focus Mamba / RetNet / ViT and their baselines, in sizes tiny..3b, registered in timm.

Build one with :func:`create_model` (which is ``timm.create_model``) once ``defocus_scale`` is imported.
For billion-parameter sharded start-up, build under ``torch.device("meta")``, then ``to_empty(device=...)``
and ``init_weights()``.
"""

from defocus_scale.models import defocus_mamba, defocus_retnet, defocus_vit  # noqa: F401  (registration)
from defocus_scale.models.defocus_mamba import DefocusMamba, DefocusMambaMixer
from defocus_scale.models.defocus_retnet import DefocusRetNet, MultiScaleRetention
from defocus_scale.models.defocus_vit import DefocusAttention, DefocusViT
from defocus_scale.models.official import CheckpointError, load_official_checkpoint
from defocus_scale.models.registry import create_model, list_families, list_models, model_defaults
from defocus_scale.models.trunk import ModelOutput, TokenClassifier

__all__ = [
    "CheckpointError",
    "DefocusAttention",
    "DefocusMamba",
    "DefocusMambaMixer",
    "DefocusRetNet",
    "DefocusViT",
    "ModelOutput",
    "MultiScaleRetention",
    "TokenClassifier",
    "create_model",
    "list_families",
    "list_models",
    "load_official_checkpoint",
    "model_defaults",
]
