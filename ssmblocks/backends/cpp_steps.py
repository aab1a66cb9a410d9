"""Decode's one-call C++ steps, bound for the ``cpp`` decode plan: a pre-norm SSM block (norm, in_proj to
out_proj, residual add) as one ``selective_ssm_step`` or ``ssd_mixer_step`` call, and the final norm with the LM
head as one ``norm_linear`` call. At batch 1 each separate op after a projection starts with cold caches (the
projection streamed megabytes of weights through them), so one call per block pays that once.

A step is bound only where it computes exactly what the modules' forward would: every module of the exact class
the model built (no PEFT adapter, no parallel variant), without hooks; every tensor plain, on the CPU, of one
dtype (float32 or float64), outside autograd and tracing; contiguous states. Elsewhere the binders return None
and the plan runs the block's forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..layers import SSD, CausalConv1d, GatedRMSNorm, RMSNorm, SelectiveSSM
from ..layers.linear import Linear
from ..layers.lm_head import LMHead
from ..state import SSMState, check_state
from . import cpp_kernels, registry

Step = Callable[[torch.Tensor], torch.Tensor]


def _bindable(x: torch.Tensor, tensors: tuple, modules: tuple[tuple[nn.Module, type], ...]) -> bool:
    """x and tensors (None skipped) as the kernels need them, each module of exactly its class, no hooks."""
    return cpp_kernels.may_run_one_float(x, *tensors) and all(
        type(m) is cls and not (m._forward_hooks or m._forward_pre_hooks) for m, cls in modules
    )


def bind_block(block: nn.Module, residual: torch.Tensor, state) -> Step | None:
    """The decode step of a ``model.Block`` with an SSM mixer, residual (b, 1, d) -> (b, 1, d), for inputs like
    ``residual``: the norm, mixer and residual add in one C++ call, then the block's MLP if it has one. None
    where it may not run."""
    mixer, norm = block.mixer, block.norm
    if type(mixer) not in _MIXERS:
        return None
    mixer_input = residual.to(norm.weight.dtype)
    check_state(state, SSMState, mixer_input, type(mixer).__name__, mixer.state_layout())  # forward's, once
    if not (state.conv.is_contiguous() and state.ssm.is_contiguous()):
        return None
    call = _MIXERS[type(mixer)](mixer, residual, state, norm)
    if call is None or block.mlp is None:
        return call
    return lambda residual: block.add_mlp(call(residual))


def _selective_ssm(mixer: SelectiveSSM, x: torch.Tensor, state: SSMState, norm: RMSNorm) -> Step | None:
    conv, in_proj, x_proj, dt_proj, out_proj = mixer.conv1d, mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj
    params = (
        in_proj.weight, in_proj.bias, conv.weight, conv.bias, x_proj.weight, dt_proj.weight, dt_proj.bias,
        mixer.A_log, mixer.D, out_proj.weight, out_proj.bias,
    )  # fmt: skip
    modules = (
        (mixer, SelectiveSSM), (in_proj, Linear), (conv, CausalConv1d), (x_proj, Linear), (dt_proj, Linear),
        (out_proj, Linear), (norm, RMSNorm),
    )  # fmt: skip
    if not _bindable(x, (state.conv, state.ssm, *params, norm.weight), modules):
        return None
    args = (state.conv, state.ssm, *params, norm.weight, norm.eps)
    return _recorded("selective_ssm_step", cpp_kernels.library().selective_ssm_step, args)


def _ssd(mixer: SSD, x: torch.Tensor, state: SSMState, norm: RMSNorm) -> Step | None:
    conv, gated, in_proj, out_proj = mixer.conv1d, mixer.norm, mixer.in_proj, mixer.out_proj
    mixing = (in_proj.weight, in_proj.bias, conv.weight, conv.bias, mixer.dt_bias, mixer.A_log, mixer.D)
    output = (out_proj.weight, out_proj.bias)
    modules = (
        (mixer, SSD), (in_proj, Linear), (conv, CausalConv1d), (gated, GatedRMSNorm), (out_proj, Linear),
        (norm, RMSNorm),
    )  # fmt: skip
    if not _bindable(x, (state.conv, state.ssm, *mixing, gated.weight, *output, norm.weight), modules):
        return None
    args = (
        state.conv, state.ssm, *mixing, *mixer.dt_limit, gated.weight, gated.eps, gated.group_size,
        gated.norm_before_gate, *output, norm.weight, norm.eps,
    )  # fmt: skip
    return _recorded("ssd_mixer_step", cpp_kernels.library().ssd_mixer_step, args)


_MIXERS = {SelectiveSSM: _selective_ssm, SSD: _ssd}


def bind_head(model: nn.Module, residual: torch.Tensor) -> Step | None:
    """``model.head`` for decode's token, residual (b, 1, d) -> logits (b, 1, vocab_size), as one C++ call (the
    final norm and the LM head) for inputs like ``residual``; None where it may not run."""
    norm, head = model.norm_f, model.lm_head
    if not _bindable(residual, (norm.weight, head.weight, head.bias), ((norm, RMSNorm), (head, LMHead))):
        return None
    args, vocab = (norm.weight, norm.eps, head.weight, head.bias), model.recipe.vocab_size
    call = _recorded("norm_linear", cpp_kernels.library().norm_linear, args)
    return lambda residual: call(residual)[..., :vocab]


def _recorded(name: str, kernel: Callable, args: tuple) -> Step:
    """x -> kernel(x, *args), noted for ``registry.record`` as op ``name`` on "cpp"."""

    def step(x: torch.Tensor) -> torch.Tensor:
        registry.note(name, "cpp")
        return kernel(x, *args)

    return step
