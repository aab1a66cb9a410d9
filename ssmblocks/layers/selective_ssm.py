"""SelectiveSSM: the Mamba1 mixer."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import check_positive
from ..ops import selective_scan, selective_scan_step
from ..state import SSMState
from ._entry import SequenceLayer
from ._init import KeepFloat32, dt_bias_init, initial_state
from ._local import local
from .conv import CausalConv1d
from .linear import Linear


class SelectiveSSM(KeepFloat32, SequenceLayer):
    """Mamba1 mixer: in_proj -> [x | z]; x -> causal conv + silu -> x_proj -> [dt | B | C];
    dt -> dt_proj -> softplus; selective scan; y * silu(z) -> out_proj.

    x: (b, l, d_model) -> (b, l, d_model). Inner width e = expand * d_model, state size n = d_state.
    A_log (e, n) and D (e,) stay float32 when the layer is cast; the scan runs in float32.
    State: ``SSMState(conv (b, e, d_conv - 1), ssm (b, e, n))``, ssm in ``state_dtype`` (float32).

    Args:
        d_model: model width d.
        d_state: state size n per channel.
        d_conv: causal conv width k.
        expand: inner width e = expand * d_model.
        dt_rank: rank of dt_proj's input; "auto" = ceil(d_model / 16).
        dt_min, dt_max: range of the initial dt (softplus(dt_proj.bias) is drawn log-uniform in it).
        dt_init_floor: initial dt is at least this.
        dt_scale: dt_proj.weight starts uniform in +-dt_scale / sqrt(dt_rank).
        conv_bias: bias in the causal conv.
        bias: bias in in_proj and out_proj.
        state_dtype: dtype of the ssm state (float32).
        device, dtype: of the parameters (A_log, D stay float32).
    """

    state_type = SSMState
    packed_natively = True
    _keep_float32 = ("A_log", "D")

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
        state_dtype: torch.dtype = torch.float32,
        device=None,
        dtype=None,
    ):
        """Build the layer; the arguments are described in the class docstring."""
        super().__init__()
        check_positive("SelectiveSSM", d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        if dt_rank != "auto":
            check_positive("SelectiveSSM", dt_rank=dt_rank)
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.state_dtype = state_dtype
        kw = {"device": device, "dtype": dtype}
        e, n, r = self.d_inner, d_state, self.dt_rank

        self.in_proj = Linear(d_model, 2 * e, bias=bias, **kw)
        self.conv1d = CausalConv1d(e, d_conv, bias=conv_bias, activation="silu", **kw)
        self.x_proj = Linear(e, r + 2 * n, bias=False, **kw)
        self.dt_proj = Linear(r, e, bias=True, **kw)
        self.A_log = nn.Parameter(torch.empty(e, n, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(e, device=device, dtype=torch.float32))
        self.out_proj = Linear(e, d_model, bias=bias, **kw)
        self.dt_init = {"dt_min": dt_min, "dt_max": dt_max, "dt_init_floor": dt_init_floor, "dt_scale": dt_scale}
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Upstream init: A = 1..n per channel (S4D-real), D = 1, softplus(dt bias) log-uniform in
        [dt_min, dt_max], dt_proj.weight uniform in +-dt_scale / sqrt(dt_rank)."""
        cfg = self.dt_init
        std = cfg["dt_scale"] / math.sqrt(self.dt_rank)
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(
            dt_bias_init(self.d_inner, cfg["dt_min"], cfg["dt_max"], cfg["dt_init_floor"], self.A_log.device)
        )
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def init_state(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None) -> SSMState:
        """Zero state. dtype is the activation dtype (conv state); the ssm state uses ``state_dtype``.
        max_seqlen is unused: the state does not grow."""
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        return SSMState(
            conv=torch.zeros(batch_size, self.local_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.local_inner, self.d_state, device=device, dtype=self.state_dtype),
        )

    def state_layout(self) -> dict:
        """Shape (after batch) and dtype of each state field, for checking a state handed in."""
        return {
            "conv": ((self.local_inner, self.d_conv - 1), None),
            "ssm": ((self.local_inner, self.d_state), self.state_dtype),
        }

    @property
    def width(self) -> int:
        return self.d_model

    @property
    def local_inner(self) -> int:
        """The inner channels this module computes: d_inner, or a rank's share under tensor parallelism."""
        return self.d_inner // self.tp_size

    def _mix(
        self,
        x: torch.Tensor,
        state: SSMState | None,
        mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, e) each
        xs = self.conv1d.conv(xs, None if state is None else state.conv, mask, cu_seqlens)
        if mask is not None:
            xs = xs * mask[..., None]
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt)  # (b, l, e), before softplus: the scan applies it
        if mask is not None:
            dt = dt.masked_fill(~mask[..., None], -math.inf)  # softplus(-inf) = 0: no decay, no input
        A, D = -torch.exp(local(self.A_log)), local(self.D)
        if state is not None and x.shape[1] == 1:
            y = selective_scan_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state.ssm, D, z[:, 0], dt_softplus=True)
            y = y[:, None]
        else:
            y, final = selective_scan(
                xs, dt, A, B, C, D, z, initial_state(state), dt_softplus=True, cu_seqlens=cu_seqlens
            )
            if state is not None:
                state.ssm.copy_(final)
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}"
