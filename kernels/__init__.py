"""Triton kernels for the hot ops on CUDA, importable as ``ssmblocks.kernels``.

Kernels are loaded lazily by the dispatch; importing ssmblocks or this package never needs Triton or a GPU.
``ssmblocks.kernels.ssd`` (the SSD chunked scan, forward and backward) imports Triton.
"""

if __name__ == "kernels":  # this folder reached as a top-level package: the repository root is on sys.path
    raise ImportError(
        "imported the repository's kernels/ folder as the top-level package 'kernels' (it is ssmblocks.kernels); "
        "with the repository root on sys.path it shadows the PyPI package 'kernels' that transformers imports: "
        "run from another folder, or take the root off sys.path"
    )


def available() -> bool:
    """Whether Triton imports, and with it the kernel modules."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
