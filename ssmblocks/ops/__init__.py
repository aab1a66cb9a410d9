"""Functional ops. Each module holds an op's sequential ``*_ref`` (the tests' oracle) and its torch
implementation ``*_torch``; the names below are the ops themselves, which run the implementation that
``ssmblocks.backends`` picks for each call (see ``ssmblocks/backends/registry.py``)."""

from ..backends.registry import (
    add_rms_norm,
    causal_conv1d,
    causal_conv1d_step,
    gated_rms_norm,
    linear,
    rms_norm,
    selective_scan,
    selective_scan_step,
    ssd_scan,
    ssd_step,
)
from .conv import causal_conv1d_ref
from .selective_scan import selective_scan_ref
from .ssd import ssd_ref

__all__ = [
    "add_rms_norm",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_step",
    "gated_rms_norm",
    "linear",
    "rms_norm",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_step",
    "ssd_ref",
    "ssd_scan",
    "ssd_step",
]
