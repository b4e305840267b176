"""Bandpass token-mixing operators (installed as ``defocus_scale.kernels``).

Each operator has a naive definition (``<op>/naive.py``, tests only), a fast PyTorch form and a Triton
kernel, all behind one public function in ``ops.py``.
"""

from .conv import causal_depthwise_conv1d
from .ops import ATTENTION_BACKENDS, SCAN_BACKENDS, defocus_attention, retention_scan, selective_scan
from .rotary import published_rotary, rotate_by_position, rotate_pairs
from .softplus import softplus

__all__ = [
    "ATTENTION_BACKENDS",
    "SCAN_BACKENDS",
    "causal_depthwise_conv1d",
    "defocus_attention",
    "published_rotary",
    "retention_scan",
    "rotate_by_position",
    "rotate_pairs",
    "selective_scan",
    "softplus",
]
