"""The ``triton`` backend: each op's Triton implementation (kernels in ``kernels/``, imported as
``ssmblocks.kernels``) with the condition under which it may run.

The kernels have a backward and are ``torch.library`` custom ops, so they run under autograd and inside
``torch.compile``. They run on CUDA tensors; under Triton's interpreter (``TRITON_INTERPRET=1``, how CI tests
them on the CPU) also on CPU tensors, when the selection is "triton". Triton is imported on first use only.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import registry

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def importable() -> bool:
    """Whether Triton is installed (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _ssd():
    """``ssmblocks.kernels.ssd``, or None where Triton does not import."""
    from .. import kernels

    if not kernels.available():
        return None
    from ..kernels import ssd

    return ssd


@functools.cache
def _selective_scan():
    """``ssmblocks.kernels.selective_scan``, or None where Triton does not import."""
    from .. import kernels

    if not kernels.available():
        return None
    from ..kernels import selective_scan

    return selective_scan


def may_run(*tensors: torch.Tensor | None) -> bool:
    """Plain tensors (no tensor subclass) on CUDA, or on the CPU under the interpreter with "triton" selected."""
    present = [t for t in tensors if t is not None]
    if all(type(t) in _PLAIN and t.is_cuda for t in present):
        return True
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and registry.selected() == "triton"
    return interpreted and all(type(t) in _PLAIN and t.device.type == "cpu" for t in present)


def ssd_scan(x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None):
    chunk = _ssd().DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    return _ssd().ssd_chunked_triton(x, dt, A, B, C, D, z, initial_state=initial_state, chunk_size=chunk)


def ssd_scan_may_run(x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None):
    return (
        x.dtype in _DTYPES
        and may_run(x, dt, A, B, C, D, z, initial_state)
        and (kernels := _ssd()) is not None
        and (chunk_size is None or chunk_size in kernels.CHUNK_SIZES)
    )


def selective_scan(x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None):
    chunk = _selective_scan().DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    return _selective_scan().selective_scan_triton(x, dt, A, B, C, D, z, initial_state=initial_state, chunk_size=chunk)


def selective_scan_may_run(x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None):
    return (
        x.dtype in _DTYPES
        and may_run(x, dt, A, B, C, D, z, initial_state)
        and (kernels := _selective_scan()) is not None
        and (chunk_size is None or chunk_size in kernels.CHUNK_SIZES)
    )


def selective_scan_step(x, dt, A, B, C, state, D=None, z=None):
    return _selective_scan().selective_scan_step_triton(x, dt, A, B, C, state, D, z)


def selective_scan_step_may_run(x, dt, A, B, C, state, D=None, z=None):
    """Also: a contiguous state updated in place, and no gradient through the step (the kernel has no backward)."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, state, D, z))
    return (
        x.dtype in _DTYPES
        and state.dtype in _DTYPES
        and state.is_contiguous()
        and not grad
        and may_run(x, dt, A, B, C, state, D, z)
        and _selective_scan() is not None
    )
