"""Parameter initialisation and precision rules shared by the SSM mixers (as in the official Mamba code)."""

from __future__ import annotations

import math

import torch
from torch import nn


def dt_bias_init(size: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None) -> torch.Tensor:
    """Bias whose softplus is a step dt drawn log-uniformly in [dt_min, dt_max] (at least dt_init_floor)."""
    u = torch.rand(size, device=device, dtype=torch.float32)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


def initial_state(state) -> torch.Tensor | None:
    """The scan's initial state from a layer state: ``state.ssm``, which the layer then overwrites in place with
    the final state; a copy of it under autograd, where the scan may keep its input for the backward
    (training through a carried state, as in truncated backpropagation through time)."""
    if state is None:
        return None
    return state.ssm.clone() if torch.is_grad_enabled() else state.ssm


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 when it already is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class KeepFloat32(nn.Module):
    """Mixin: the parameters named in ``_keep_float32`` never drop below float32 when the module is cast.

    ``layer.to(torch.bfloat16)`` (or ``.half()``, ``.bfloat16()``) moves them to the new device but keeps
    their float32 values, as the official Mamba checkpoints keep A_log, D and dt_bias; ``.double()``
    promotes them like every other parameter.
    """

    _keep_float32: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        before = {name: getattr(self, name).data for name in self._keep_float32}
        super()._apply(fn, recurse)
        for name, old in before.items():
            param = getattr(self, name)
            lowered = param.is_floating_point() and torch.finfo(param.dtype).bits < torch.finfo(old.dtype).bits
            if old.dtype == torch.float32 and lowered:
                param.data = old.to(param.device)
        return self
