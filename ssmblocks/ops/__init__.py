"""Functional ops: each has a sequential ``*_ref`` and a fast torch path (no loop over time steps)."""

from .conv import causal_conv1d, causal_conv1d_ref
from .norm import gated_rms_norm, rms_norm
from .selective_scan import selective_scan, selective_scan_ref, selective_scan_step
from .ssd import ssd_chunked, ssd_ref, ssd_step

__all__ = [
    "causal_conv1d",
    "causal_conv1d_ref",
    "gated_rms_norm",
    "rms_norm",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_step",
    "ssd_chunked",
    "ssd_ref",
    "ssd_step",
]
