"""Elementwise math the kernels share.

Compiled for a GPU, softplus takes the hardware's approximate logarithm (``lg2.approx``, relative error about
2^-22): the precise ``tl.log`` is a ~20-instruction polynomial, and in the selective-scan kernels the (c, e)
tile it runs on is replicated across the lanes that hold the state components, so it was a third of the
backward's instructions. Triton's interpreter has no fast logarithm and uses ``tl.log``.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

_COMPILED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e): exp2 is one instruction


@triton.jit
def softplus(x):
    """log(1 + exp(x)) of float32 x, and x itself above 20."""
    if _COMPILED:
        val = libdevice.fast_logf(1.0 + tl.exp(x))
    else:
        val = tl.log(1.0 + tl.exp(x))
    return tl.where(x > 20.0, x, val)
