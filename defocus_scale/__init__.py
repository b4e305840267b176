"""defocus-scale: pretraining system for De-focus Attention Networks (arXiv 2406.04342)."""

__version__ = "0.1.0"
