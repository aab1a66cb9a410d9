"""Triton kernels for the hot ops on CUDA, importable as ``ssmblocks.kernels``.

Kernels are loaded lazily by the dispatch; importing ssmblocks or this package never needs Triton or a GPU.
``ssmblocks.kernels.ssd`` (the SSD chunked scan, forward and backward) imports Triton.
"""

import importlib.util


def available() -> bool:
    """Whether Triton is installed, so that the kernel modules import."""
    return importlib.util.find_spec("triton") is not None
