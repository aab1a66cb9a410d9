"""The ``triton`` backend: each op's Triton implementation (kernels in ``kernels/``, imported as
``ssmblocks.kernels``) with the condition under which it may run.

The kernels have a backward and are ``torch.library`` custom ops, so they run under autograd and inside
``torch.compile``. They run on CUDA tensors; under Triton's interpreter (``TRITON_INTERPRET=1``, how CI tests
them on the CPU) also on CPU tensors, when the selection is "triton". Triton is imported on first use only.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import registry

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def importable() -> bool:
    """Whether Triton is installed (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


_MODULES: dict = {}  # name -> kernel module (or None without Triton), filled on first use


def _kernel(name: str):
    """The kernel module ``ssmblocks.kernels.<name>``, or None where Triton does not import. Plain import
    statements on first use, which torch.compile runs as it traces (it will not trace importlib, so a graph would
    break); a dict lookup after that."""
    if name not in _MODULES:
        from .. import kernels

        if kernels.available():
            from ..kernels import conv1d, norm, selective_scan, ssd, ssd_step  # noqa: F401  (the names _kernel takes)
        _MODULES[name] = getattr(kernels, name) if kernels.available() else None
    return _MODULES[name]


def _grad_needed(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def may_run(*tensors: torch.Tensor | None) -> bool:
    """Plain tensors (no tensor subclass) on CUDA, or on the CPU under the interpreter with "triton" selected."""
    present = [t for t in tensors if t is not None]
    if all(type(t) in _PLAIN and t.is_cuda for t in present):
        return True
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and registry.selected() == "triton"
    return interpreted and all(type(t) in _PLAIN and t.device.type == "cpu" for t in present)


def _int32(cu_seqlens):
    return None if cu_seqlens is None else cu_seqlens.to(torch.int32)


def ssd_scan(x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None, cu_seqlens=None):
    chunk = _kernel("ssd").DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    return _kernel("ssd").ssd_chunked_triton(
        x, dt, A, B, C, D, z, initial_state=initial_state, cu_seqlens=_int32(cu_seqlens), chunk_size=chunk
    )


def ssd_scan_may_run(x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None, cu_seqlens=None):
    return (
        x.dtype in _DTYPES
        and may_run(x, dt, A, B, C, D, z, initial_state, cu_seqlens)
        and (kernels := _kernel("ssd")) is not None
        and (chunk_size is None or chunk_size in kernels.CHUNK_SIZES)
    )


def causal_conv1d(x, weight, bias=None, activation=None, conv_state=None, mask=None, cu_seqlens=None):
    return _kernel("conv1d").causal_conv1d_triton(
        x, weight, bias, activation, conv_state, mask, cu_seqlens=_int32(cu_seqlens)
    )


def causal_conv1d_may_run(x, weight, bias=None, activation=None, conv_state=None, mask=None, cu_seqlens=None):
    return (
        x.dtype in _DTYPES
        and x.dim() == 3
        and may_run(x, weight, bias, conv_state, mask, cu_seqlens)
        and (kernels := _kernel("conv1d")) is not None
        and 2 <= weight.shape[-1] <= kernels.MAX_WIDTH
        and not (conv_state is not None and conv_state.requires_grad)  # no gradient for the carried state
    )


def causal_conv1d_step(x, conv_state, weight, bias=None, activation=None, state_indices=None):
    return _kernel("conv1d").causal_conv1d_step_triton(x, conv_state, weight, bias, activation, state_indices)


def causal_conv1d_step_may_run(x, conv_state, weight, bias=None, activation=None, state_indices=None):
    return (
        x.dtype in _DTYPES
        and may_run(x, conv_state, weight, bias, state_indices)
        and (kernels := _kernel("conv1d")) is not None
        and 2 <= weight.shape[-1] <= kernels.MAX_WIDTH
        and conv_state.stride(-1) == 1
        and not _grad_needed(x, conv_state, weight, bias)  # a decode step: no backward
    )


def _norm_may_run(x, weight, group_size, *others) -> bool:
    group_size = group_size or x.shape[-1]
    return (
        x.dtype in _DTYPES
        and x.numel() > 0
        and may_run(x, weight, *others)
        and (kernels := _kernel("norm")) is not None
        and group_size <= kernels.MAX_GROUP
    )


def rms_norm(x, weight, eps, group_size=None):
    return _kernel("norm").rms_norm_triton(x, weight, eps, group_size)


def rms_norm_may_run(x, weight, eps, group_size=None):
    return _norm_may_run(x, weight, group_size)


def gated_rms_norm(x, z, weight, eps, group_size=None, norm_before_gate=False):
    return _kernel("norm").gated_rms_norm_triton(x, z, weight, eps, group_size, norm_before_gate)


def gated_rms_norm_may_run(x, z, weight, eps, group_size=None, norm_before_gate=False):
    return _norm_may_run(x, weight, group_size, z)


def add_rms_norm(x, residual, weight, eps):
    return _kernel("norm").add_rms_norm_triton(x, residual, weight, eps)


def add_rms_norm_may_run(x, residual, weight, eps):
    return _norm_may_run(x, weight, None, residual) and residual.dtype in _DTYPES


def ssd_step(x, dt, A, B, C, state, D=None, z=None, state_indices=None):
    return _kernel("ssd_step").ssd_step_triton(x, dt, A, B, C, state, D, z, state_indices)


def ssd_step_may_run(x, dt, A, B, C, state, D=None, z=None, state_indices=None):
    return (
        x.dtype in _DTYPES
        and may_run(x, dt, A, B, C, state, D, z, state_indices)
        and _kernel("ssd_step") is not None
        and state.is_contiguous()
        and not _grad_needed(x, dt, A, B, C, state, D, z)  # a decode step: no backward
    )


def selective_scan(
    x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None, *, dt_softplus=False, cu_seqlens=None
):
    chunk = _kernel("selective_scan").DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    return _kernel("selective_scan").selective_scan_triton(
        x, dt, A, B, C, D, z, dt_softplus=dt_softplus, initial_state=initial_state, cu_seqlens=_int32(cu_seqlens),
        chunk_size=chunk,
    )


def selective_scan_may_run(
    x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None, *, dt_softplus=False, cu_seqlens=None
):
    return (
        x.dtype in _DTYPES
        and may_run(x, dt, A, B, C, D, z, initial_state, cu_seqlens)
        and (kernels := _kernel("selective_scan")) is not None
        and (chunk_size is None or chunk_size in kernels.CHUNK_SIZES)
    )


def selective_scan_step(x, dt, A, B, C, state, D=None, z=None, state_indices=None, *, dt_softplus=False):
    return _kernel("selective_scan").selective_scan_step_triton(
        x, dt, A, B, C, state, D, z, state_indices, dt_softplus=dt_softplus
    )


def selective_scan_step_may_run(x, dt, A, B, C, state, D=None, z=None, state_indices=None, *, dt_softplus=False):
    """Also: a contiguous state updated in place, and no gradient through the step (the kernel has no backward)."""
    return (
        x.dtype in _DTYPES
        and state.dtype in _DTYPES
        and state.is_contiguous()
        and not _grad_needed(x, dt, A, B, C, state, D, z)
        and may_run(x, dt, A, B, C, state, D, z, state_indices)
        and _kernel("selective_scan") is not None
    )
