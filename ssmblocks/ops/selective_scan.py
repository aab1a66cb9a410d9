"""Selective scan (Mamba1): the diagonal linear recurrence with input-dependent dt, B, C.

    h_t = exp(dt_t * A) * h_{t-1} + (dt_t * x_t) B_t        h: (b, e, n)
    y_t = h_t C_t + D * x_t,   then  y_t *= silu(z_t)

Shapes: x, dt, z: (b, l, e); A: (e, n); B, C: (b, l, n); D: (e,); state: (b, e, n).
``dt`` is the step (dt >= 0), or with ``dt_softplus=True`` its value before softplus (the step is then
softplus(dt), computed in the working dtype: layers hand over dt_proj's output without an elementwise pass of
their own). Every function returns ``y`` in x's dtype and computes in float32 (float64 when x is float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .packing import scan_by_length
from .pool import on_slots
from .ssd import update_state

# Largest |log decay| inside one chunk for which exp(+-log decay) is safe in float32, backward included.
_FACTORISED_LIMIT = 60.0


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def step_size(dt: torch.Tensor, dt_softplus: bool, dtype: torch.dtype) -> torch.Tensor:
    """dt in ``dtype``, through softplus when ``dt_softplus``."""
    dt = dt.to(dtype)
    return F.softplus(dt) if dt_softplus else dt


def _finish(y, x, D, z):
    if D is not None:
        y = y + x * D.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_ref(x, dt, A, B, C, D=None, z=None, initial_state=None, *, dt_softplus: bool = False):
    """The recurrence above, one time step after another. Returns (y, final_state)."""
    wd = _work_dtype(x)
    b, l, e = x.shape
    h = x.new_zeros(b, e, A.shape[-1], dtype=wd) if initial_state is None else initial_state.to(wd)
    A, xw, dt, B, C = A.to(wd), x.to(wd), step_size(dt, dt_softplus, wd), B.to(wd), C.to(wd)
    ys = []
    for t in range(l):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * xw[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = _finish(torch.stack(ys, dim=1), xw, D, z)
    return y.to(x.dtype), h


CHUNK_SIZE = 16  # steps per chunk of the torch path when none is given


def selective_scan_torch(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    initial_state=None,
    chunk_size: int | None = None,
    *,
    dt_softplus: bool = False,
    cu_seqlens=None,
):
    """Chunked selective scan: a Python loop over chunks only (state passed between them).

    Inside a chunk of c steps, with cumulative log decay L_t = A * sum_{r<=t} dt_r (relative to the chunk
    start), the states are h_t = exp(L_t) * (h_start + cumsum_s(exp(-L_s) * u_s)), u_s = dt_s x_s B_s, the
    cumulative sum being a matmul with a triangle of ones. That factorisation needs |L| small enough for
    exp(-L); a chunk that decays further than that gets its states from a log-depth (Hillis-Steele) scan
    instead, which only multiplies decays <= 1. Without autograd the loop runs in place in reused buffers.
    chunk_size: c (None: ``CHUNK_SIZE``). Returns (y, final_state).
    cu_seqlens: (s + 1,) int boundaries of s packed sequences (b = 1), each scanned alone from
    initial_state[i] (s, e, n) or zeros; final_state is then (s, e, n). Here sequences of similar length run
    together as a right-padded batch (a step size of 0 after each sequence).
    """
    if cu_seqlens is not None:
        def scan(x, dt, B, C, z, initial_state):
            return selective_scan_torch(x, dt, A, B, C, D, z, initial_state, chunk_size, dt_softplus=dt_softplus)

        dt_pad = -math.inf if dt_softplus else 0.0  # softplus(-inf) = 0
        tokens = {"x": (x, 0.0), "dt": (dt, dt_pad), "B": (B, 0.0), "C": (C, 0.0), "z": (z, 0.0)}
        return scan_by_length(scan, cu_seqlens, tokens, initial_state)
    wd = _work_dtype(x)
    chunk_size = CHUNK_SIZE if chunk_size is None else chunk_size
    b, l, e = x.shape
    A, xw, dt, B, C = A.to(wd), x.to(wd), step_size(dt, dt_softplus, wd), B.to(wd), C.to(wd)
    h = x.new_zeros(b, e, A.shape[-1], dtype=wd) if initial_state is None else initial_state.to(wd, copy=True)

    if torch.compiler.is_compiling():  # a data-dependent branch would split the graph: the stable one for all
        factorised = [False] * -(-l // chunk_size)
    else:
        chunk_dt = F.pad(dt, (0, 0, 0, -l % chunk_size)).view(b, -1, chunk_size, e).sum(2)  # (b, l/c, e)
        factorised = ((chunk_dt * A.abs().amax(-1)).amax(dim=(0, 2)) <= _FACTORISED_LIMIT).tolist()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, h))
    y, h = (_scan if grad else _scan_in_place)(xw, dt, A, B, C, h, chunk_size, factorised)
    return _finish(y, xw, D, z).to(x.dtype), h


def _scan(x, dt, A, B, C, h, chunk_size, factorised):
    """The chunk loop with autograd. x, dt: (b, l, e); B, C: (b, l, n); h: (b, e, n) initial state.
    Returns the scan part of y (b, l, e) and the final state."""
    ones = torch.ones(chunk_size, chunk_size, dtype=x.dtype, device=x.device).tril()
    ys = []
    for i, s in enumerate(range(0, x.shape[1], chunk_size)):
        dts = dt[:, s : s + chunk_size]  # (b, c, e)
        c = dts.shape[1]
        u = (dts * x[:, s : s + c])[..., None] * B[:, s : s + c, None, :]  # (b, c, e, n)
        if factorised[i]:
            log_decay = dts.cumsum(1)[..., None] * A  # (b, c, e, n), <= 0
            summed = torch.einsum("ts,bsen->bten", ones[:c, :c], u * torch.exp(-log_decay))
            states = torch.exp(log_decay) * (h[:, None] + summed)
        else:
            states = _chunk_states_log_depth(torch.exp(dts[..., None] * A), u, h)
        ys.append(torch.einsum("bcen,bcn->bce", states, C[:, s : s + c]))
        h = states[:, -1]
    return torch.cat(ys, dim=1), h


def _scan_in_place(x, dt, A, B, C, h, chunk_size, factorised):
    """The same loop without autograd, time-major in three reused buffers; h is updated in place to the
    final state. Returns (y, h)."""
    b, l, e = x.shape
    n = A.shape[-1]
    decay, u, states = (x.new_empty(chunk_size, b, e, n) for _ in range(3))
    ones = torch.ones(chunk_size, chunk_size, dtype=x.dtype, device=x.device).tril()
    y = x.new_empty(l, b, e)
    dtx, dt, B, C = (dt * x).transpose(0, 1), dt.transpose(0, 1), B.transpose(0, 1), C.transpose(0, 1)
    for i, s in enumerate(range(0, l, chunk_size)):
        c = min(chunk_size, l - s)
        d, w, st = decay[:c], u[:c], states[:c]
        torch.mul(dtx[s : s + c, :, :, None], B[s : s + c, :, None, :], out=w)  # u_t = dt_t x_t B_t
        if factorised[i]:
            torch.mul(dt[s : s + c].cumsum(0)[..., None], A, out=d).exp_()  # exp(L_t)
            w.div_(d)[0].add_(h)
            torch.matmul(ones[:c, :c], w.view(c, -1), out=st.view(c, -1)).view_as(st).mul_(d)
        else:
            st.copy_(_chunk_states_log_depth(torch.exp(dt[s : s + c, :, :, None] * A), w, h, dim=0))
        h.copy_(st[-1])
        torch.sum(torch.mul(st, C[s : s + c, :, None, :], out=d), dim=-1, out=y[s : s + c])
    return y.transpose(0, 1), h


def _chunk_states_log_depth(decay, u, h, dim: int = 1):
    """States of one chunk by recursive doubling along the time ``dim``.

    decay, u: (b, c, e, n) for dim 1, (c, b, e, n) for dim 0; h: (b, e, n). Returns decay's shape.
    """
    c, k = decay.shape[dim], 1
    while k < c:
        first, later, earlier = slice(0, k), slice(k, c), slice(0, c - k)
        at = lambda t, part: t[(slice(None),) * dim + (part,)]  # noqa: E731
        u = torch.cat([at(u, first), at(u, later) + at(decay, later) * at(u, earlier)], dim=dim)
        decay = torch.cat([at(decay, first), at(decay, later) * at(decay, earlier)], dim=dim)
        k *= 2
    return decay * h.unsqueeze(dim) + u


def selective_scan_step_torch(x, dt, A, B, C, state, D=None, z=None, state_indices=None, *, dt_softplus=False):
    """One token. x, dt, z: (b, e); B, C: (b, n); state: (b, e, n), updated in place. Returns y: (b, e).

    With ``state_indices`` (b,) of distinct slots, state is a pool (s, e, n) and row i reads and writes
    state[state_indices[i]]; the other slots are left as they are.
    """
    if state_indices is not None:
        return on_slots(
            state,
            state_indices,
            x.shape[0],
            lambda rows: selective_scan_step_torch(x, dt, A, B, C, rows, D, z, dt_softplus=dt_softplus),
        )
    wd = _work_dtype(x)
    xw = x.to(wd)
    dt = step_size(dt, dt_softplus, wd)
    h = update_state(state, torch.exp(dt[..., None] * A.to(wd)), (dt * xw)[..., None], B.to(wd)[:, None, :])
    y = (h @ C.to(wd)[:, :, None])[..., 0]  # (b, e)
    return _finish(y, xw, D, z).to(x.dtype)
