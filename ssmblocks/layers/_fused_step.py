"""When a mixer's decode step may run as one C++ call: ``selective_ssm_step`` (SelectiveSSM) or
``ssd_mixer_step`` (SSD) of ``ssmblocks/ops/selective_scan_cpu.cpp``, from the input projection to the output
projection. At batch 1 each separate op after a projection starts with cold caches (the projection streamed
megabytes of weights through them) and costs 10-50 us whatever its size; one call per mixer pays that once
(docs/benchmarks.md)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.cpu_kernel import cpu_kernels_may_run, cpu_ops
from ..state import SSMState

_FLOATS = (torch.float32, torch.float64)
_PLAIN = (torch.Tensor, nn.Parameter)  # a parameter of a tensor subclass (torchao, DTensor) has the subclass's type


def fused_step_kernels(
    x: torch.Tensor,
    state: SSMState,
    tensors: tuple[torch.Tensor | None, ...],
    modules: tuple[tuple[nn.Module, type], ...],
):
    """``torch.ops.ssmblocks_cpu`` when the one-call step may run, else None.

    x: the mixer's input, one token; tensors: the parameters the call reads (None skipped);
    modules: the mixer's inner modules with the class each must have exactly, the one the mixer built (a
    PEFT adapter replaces a module, tensor parallelism may change its class), and no hooks. Also needed: x,
    the parameters and both states of one dtype, float32 or float64, all plain tensors (not quantized or
    distributed), contiguous states, on the CPU without autograd or tracing.
    """
    present = [x, state.conv, state.ssm, *(t for t in tensors if t is not None)]
    if (
        x.dtype in _FLOATS
        and all(type(t) in _PLAIN and t.dtype == x.dtype for t in present)
        and state.conv.is_contiguous()
        and state.ssm.is_contiguous()
        and all(type(m) is cls and not (m._forward_hooks or m._forward_pre_hooks) for m, cls in modules)
        and cpu_kernels_may_run(*present)
    ):
        return cpu_ops()
    return None
