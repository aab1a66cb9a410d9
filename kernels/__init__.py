"""Triton kernels for the hot ops on CUDA, importable as ``ssmblocks.kernels``.

Kernels are loaded lazily by the dispatch; importing ssmblocks or this package never needs Triton or a GPU.
``ssmblocks.kernels.ssd`` (the SSD chunked scan, forward and backward) imports Triton.
"""


def available() -> bool:
    """Whether Triton imports, and with it the kernel modules."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
