"""Triton kernels for the hot ops on CUDA, importable as ``ssmblocks.kernels``.

Kernels are loaded lazily by the dispatch in ``ssmblocks.ops``; importing ssmblocks never needs Triton.
"""
