"""When a mixer's decode step may run as one C++ call: ``selective_ssm_step`` (SelectiveSSM) or
``ssd_mixer_step`` (SSD) of ``ssmblocks/backends/cpp/decode_steps.cpp``, from the input projection to the output
projection. At batch 1 each separate op after a projection starts with cold caches (the projection streamed
megabytes of weights through them) and costs 10-50 us whatever its size; one call per mixer pays that once
(docs/benchmarks.md)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check_hidden
from ..ops.cpu_kernel import cpu_kernels_take, cpu_ops
from ..state import SSMState, check_state
from .norm import RMSNorm


def one_call_kernels(
    x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...], modules: tuple[tuple[nn.Module, type], ...]
):
    """``torch.ops.ssmblocks_cpu`` when a one-call C++ step may run on input x, else None.

    tensors: the other tensors the call reads or writes (None skipped); modules: the modules whose work the
    call does, each with the class it must have exactly, the one the model built (a PEFT adapter replaces a
    module, tensor parallelism may change its class), and no hooks. Also needed: x and every tensor of one
    dtype, float32 or float64, plain tensors (not quantized or distributed), on the CPU without autograd or
    tracing.
    """
    if cpu_kernels_take(x, *tensors) and all(
        type(m) is cls and not (m._forward_hooks or m._forward_pre_hooks) for m, cls in modules
    ):
        return cpu_ops()
    return None


def fused_step_kernels(
    layer: nn.Module,
    x: torch.Tensor,
    state: SSMState,
    tensors: tuple[torch.Tensor | None, ...],
    modules: tuple[tuple[nn.Module, type], ...],
    block_norm: RMSNorm | None = None,
):
    """``torch.ops.ssmblocks_cpu`` when the one-call step of ``layer`` may run, else None.

    x: the input, one token (b, 1, d); tensors, modules: as for one_call_kernels, the layer's parameters and
    inner modules. block_norm: the norm of the pre-norm residual block around the layer, whose step the call
    then runs; the layer's forward is bypassed, so its checks of x and the state are made here. The states
    must be contiguous.
    """
    if block_norm is not None:
        tensors, modules = (*tensors, block_norm.weight), (*modules, (block_norm, RMSNorm))
        if not isinstance(state, layer.state_type):
            return None  # forward names the mismatch
    if not (state.conv.is_contiguous() and state.ssm.is_contiguous()):
        return None
    if (ops := one_call_kernels(x, (state.conv, state.ssm, *tensors), modules)) is None:
        return None
    if block_norm is not None:
        name = type(layer).__name__
        check_hidden(x, layer.width, name)
        check_state(state, layer.state_type, x, name, layer.state_layout())
    return ops


def block_norm_args(block_norm: RMSNorm | None) -> tuple:
    """The C++ step's last two arguments: the block norm's weight and eps, or none."""
    return (None, 0.0) if block_norm is None else (block_norm.weight, block_norm.eps)


class FusedStep:
    """Mixin of the mixers with a one-call decode step: ``fused_step`` runs the step that ``fused_call``
    (each mixer's own) checks and binds."""

    def fused_step(self, x: torch.Tensor, state: SSMState, block_norm: RMSNorm | None = None) -> torch.Tensor | None:
        """``fused_call(x, state, block_norm)(x)``, or None where it may not run (the state then unchanged)."""
        call = self.fused_call(x, state, block_norm)
        return None if call is None else call(x)
