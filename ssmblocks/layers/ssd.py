"""SSD: the Mamba2 mixer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check_positive
from ..ops import ssd_scan, ssd_step
from ..state import SSMState
from ._entry import SequenceLayer
from ._init import KeepFloat32, at_least_float32, dt_bias_init, initial_state
from ._local import local
from .conv import CausalConv1d
from .linear import Linear
from .norm import GatedRMSNorm


class SSD(KeepFloat32, SequenceLayer):
    """Mamba2 mixer: in_proj -> [z | x | B | C | dt]; causal conv + silu over [x | B | C];
    SSD scan with one decay per head; gated RMS norm with z (per group); out_proj.

    x: (b, l, d_model) -> (b, l, d_model). Inner width e = expand * d_model = h * p heads of
    head_dim p; B and C have n_groups g, each shared by h / g heads; state size n = d_state.
    A_log, D and dt_bias stay float32 when the layer is cast; the scan runs in float32.
    State: ``SSMState(conv (b, e + 2 g n, d_conv - 1), ssm (b, h, p, n))``, ssm in ``state_dtype``.
    ``chunk_size``: the chunk of the chunked algorithm, or None for each implementation's own (the torch
    path's is 64, its fastest on CPU). The chunk changes the order of the arithmetic, never the result.

    Args:
        d_model: model width d.
        d_state: state size n per head.
        d_conv: causal conv width k.
        expand: inner width e = expand * d_model.
        head_dim: head size p; heads h = e / p (must divide e).
        n_groups: groups g of B and C (must divide h).
        chunk_size: chunk of the chunked scan, or None for each implementation's own.
        dt_min, dt_max: range of the initial dt (softplus(dt_bias) is drawn log-uniform in it).
        dt_init_floor: initial dt is at least this.
        dt_limit: (low, high) clamp of dt after the softplus; (0, inf) clamps nothing.
        A_init_range: the decay rate exp(A_log) (A = -exp(A_log)) starts uniform in this range, one per head.
        D_has_hdim: skip weight D per channel (e values) instead of per head (h values).
        norm_before_gate: gated norm as norm(y) * silu(z) instead of norm(y * silu(z)) (Mamba2: False).
        norm_eps: epsilon of the gated RMS norm.
        conv_bias: bias in the causal conv.
        bias: bias in in_proj and out_proj.
        state_dtype: dtype of the ssm state (float32).
        device, dtype: of the parameters (A_log, D, dt_bias stay float32).
    """

    state_type = SSMState
    packed_natively = True
    _keep_float32 = ("A_log", "D", "dt_bias")

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        chunk_size: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, math.inf),
        A_init_range: tuple[float, float] = (1.0, 16.0),
        D_has_hdim: bool = False,
        norm_before_gate: bool = False,
        norm_eps: float = 1e-5,
        conv_bias: bool = True,
        bias: bool = False,
        state_dtype: torch.dtype = torch.float32,
        device=None,
        dtype=None,
    ):
        """Build the layer; the arguments are described in the class docstring."""
        super().__init__()
        check_positive(
            "SSD",
            d_model=d_model,
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            head_dim=head_dim,
            n_groups=n_groups,
        )
        if chunk_size is not None:
            check_positive("SSD", chunk_size=chunk_size)
        e = expand * d_model
        if e % head_dim:
            raise ValueError(f"SSD: head_dim={head_dim} must divide d_inner = expand * d_model = {e}")
        h = e // head_dim
        if h % n_groups:
            raise ValueError(f"SSD: n_groups={n_groups} must divide the number of heads {h}")
        self.d_model, self.d_state, self.d_conv, self.d_inner = d_model, d_state, d_conv, e
        self.head_dim, self.n_heads, self.n_groups, self.chunk_size = head_dim, h, n_groups, chunk_size
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.state_dtype = state_dtype
        self.conv_dim = e + 2 * n_groups * d_state
        kw = {"device": device, "dtype": dtype}

        self.in_proj = Linear(d_model, e + self.conv_dim + h, bias=bias, **kw)
        self.conv1d = CausalConv1d(self.conv_dim, d_conv, bias=conv_bias, activation="silu", **kw)
        self.dt_bias = nn.Parameter(torch.empty(h, device=device, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(h, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(e if D_has_hdim else h, device=device, dtype=torch.float32))
        self.norm = GatedRMSNorm(e, norm_eps, group_size=e // n_groups, norm_before_gate=norm_before_gate, **kw)
        self.out_proj = Linear(e, d_model, bias=bias, **kw)
        self.dt_init = {"dt_min": dt_min, "dt_max": dt_max, "dt_init_floor": dt_init_floor}
        self.A_init_range = A_init_range
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Upstream init: A uniform in A_init_range per head, D = 1, softplus(dt_bias) log-uniform in
        [dt_min, dt_max]."""
        device = self.A_log.device
        self.dt_bias.copy_(dt_bias_init(self.n_heads, **self.dt_init, device=device))
        A = torch.empty(self.n_heads, dtype=torch.float32, device=device).uniform_(*self.A_init_range)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)

    def init_state(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None) -> SSMState:
        """Zero state. dtype is the activation dtype (conv state); the ssm state uses ``state_dtype``.
        max_seqlen is unused: the state does not grow."""
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        return SSMState(
            conv=torch.zeros(batch_size, self.local_conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(
                batch_size, self.local_heads, self.head_dim, self.d_state, device=device, dtype=self.state_dtype
            ),
        )

    def state_layout(self) -> dict:
        """Shape (after batch) and dtype of each state field, for checking a state handed in."""
        ssm = (self.local_heads, self.head_dim, self.d_state)
        return {"conv": ((self.local_conv_dim, self.d_conv - 1), None), "ssm": (ssm, self.state_dtype)}

    @property
    def width(self) -> int:
        return self.d_model

    @property
    def local_heads(self) -> int:
        """The heads this module computes: n_heads, or a rank's share under tensor parallelism."""
        return self.n_heads // self.tp_size

    @property
    def local_conv_dim(self) -> int:
        """The conv channels this module computes: conv_dim, or a rank's share under tensor parallelism."""
        return self.conv_dim // self.tp_size

    def _mix(
        self,
        x: torch.Tensor,
        state: SSMState | None,
        mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, l, _ = x.shape
        h, p, n = self.local_heads, self.head_dim, self.d_state
        e = h * p
        z, xbc, dt = self.in_proj(x).split([e, self.local_conv_dim, h], dim=-1)
        xbc = self.conv1d.conv(xbc, None if state is None else state.conv, mask, cu_seqlens)
        g = (xbc.shape[-1] - e) // (2 * n)  # the groups of B and C these heads read
        xs, B, C = xbc.split([e, g * n, g * n], dim=-1)
        dt = F.softplus(at_least_float32(dt) + local(self.dt_bias)).clamp(*self.dt_limit)  # (b, l, h)
        if mask is not None:
            dt = dt * mask[..., None]  # dt = 0: no decay, no input
            xs = xs * mask[..., None]
        A, D = -torch.exp(local(self.A_log)), local(self.D)
        D = D.view(h, p) if D.numel() == e else D
        xs, B, C = xs.view(b, l, h, p), B.view(b, l, g, n), C.view(b, l, g, n)
        if state is not None and l == 1:
            y = ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state.ssm, D)[:, None]
        else:
            init, chunk = initial_state(state), self.chunk_size
            y, final = ssd_scan(xs, dt, A, B, C, D, initial_state=init, chunk_size=chunk, cu_seqlens=cu_seqlens)
            if state is not None:
                state.ssm.copy_(final)
        y = self.norm(y.reshape(b, l, e), z)
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, heads={self.n_heads}x{self.head_dim}, "
            f"n_groups={self.n_groups}, d_state={self.d_state}"
        )
