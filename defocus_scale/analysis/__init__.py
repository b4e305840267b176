"""Over-focus diagnostics: token-mixing matrices and the paper's gradient maps, per layer."""

from defocus_scale.analysis.diagnostics import (
    LayerDiagnostics,
    diagnose,
    distribution_summary,
    token_influence,
)
from defocus_scale.analysis.mixing import (
    LayerMixing,
    attention_mixing_matrix,
    layer_mixing,
    retention_mixing_matrix,
    selective_scan_mixing_matrix,
)

__all__ = [
    "LayerDiagnostics",
    "LayerMixing",
    "attention_mixing_matrix",
    "diagnose",
    "distribution_summary",
    "layer_mixing",
    "retention_mixing_matrix",
    "selective_scan_mixing_matrix",
    "token_influence",
]
