"""Selective scan (Mamba1): the diagonal linear recurrence with input-dependent dt, B, C.

    h_t = exp(dt_t * A) * h_{t-1} + (dt_t * x_t) B_t        h: (b, e, n)
    y_t = h_t C_t + D * x_t,   then  y_t *= silu(z_t)

Shapes: x, dt, z: (b, l, e); A: (e, n); B, C: (b, l, n); D: (e,); state: (b, e, n).
``dt`` is the step after softplus and bias (dt >= 0). Every function returns ``y`` in x's dtype and
computes in float32 (float64 when x is float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest |log decay| inside one chunk for which exp(+-log decay) is safe in float32, backward included.
_FACTORISED_LIMIT = 60.0


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finish(y, x, D, z):
    if D is not None:
        y = y + x * D.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_ref(x, dt, A, B, C, D=None, z=None, initial_state=None):
    """The recurrence above, one time step after another. Returns (y, final_state)."""
    wd = _work_dtype(x)
    b, l, e = x.shape
    h = x.new_zeros(b, e, A.shape[-1], dtype=wd) if initial_state is None else initial_state.to(wd)
    A, xw, dt, B, C = A.to(wd), x.to(wd), dt.to(wd), B.to(wd), C.to(wd)
    ys = []
    for t in range(l):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * xw[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = _finish(torch.stack(ys, dim=1), xw, D, z)
    return y.to(x.dtype), h


def selective_scan(x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size: int = 8):
    """Chunked selective scan: a Python loop over chunks only (state passed between them).

    Inside a chunk of c steps, with cumulative log decay L_t = A * sum_{r<=t} dt_r (relative to the chunk
    start), the states are h_t = exp(L_t) * (h_start + cumsum_s(exp(-L_s) * u_s)), u_s = dt_s x_s B_s.
    That factorisation needs |L| small enough for exp(-L); when some chunk decays further than that, the
    chunk states come from a log-depth (Hillis-Steele) scan instead, which only multiplies decays <= 1.
    Returns (y, final_state).
    """
    wd = _work_dtype(x)
    b, l, e = x.shape
    A, xw, dt, B, C = A.to(wd), x.to(wd), dt.to(wd), B.to(wd), C.to(wd)
    h = x.new_zeros(b, e, A.shape[-1], dtype=wd) if initial_state is None else initial_state.to(wd, copy=True)

    pad = -l % chunk_size
    chunk_dt = F.pad(dt, (0, 0, 0, pad)).view(b, -1, chunk_size, e).sum(2)  # (b, l/c, e)
    factorised = bool((chunk_dt * A.abs().amax(-1)).amax() <= _FACTORISED_LIMIT)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, h))
    if factorised and not grad:
        return _finish(_scan_in_place(xw, dt, A, B, C, h, chunk_size), xw, D, z).to(x.dtype), h

    ys = []
    for s in range(0, l, chunk_size):
        dts = dt[:, s : s + chunk_size]  # (b, c, e)
        u = (dts * xw[:, s : s + chunk_size])[..., None] * B[:, s : s + chunk_size, None, :]  # (b, c, e, n)
        if factorised:
            log_decay = dts.cumsum(1)[..., None] * A  # (b, c, e, n), <= 0
            states = torch.exp(log_decay) * (h[:, None] + (u * torch.exp(-log_decay)).cumsum(1))
        else:
            states = _chunk_states_log_depth(torch.exp(dts[..., None] * A), u, h)
        ys.append(torch.einsum("bcen,bcn->bce", states, C[:, s : s + chunk_size]))
        h = states[:, -1]
    y = _finish(torch.cat(ys, dim=1), xw, D, z)
    return y.to(x.dtype), h


def _scan_in_place(x, dt, A, B, C, h, chunk_size):
    """The factorised chunk loop without autograd, in two reused buffers; h (b, e, n) is updated in place.

    Same arithmetic as the autograd loop in selective_scan; returns the scan part of y, (b, l, e).
    """
    b, l, e = x.shape
    decay = x.new_empty(b, chunk_size, e, A.shape[-1])
    states = torch.empty_like(decay)
    ys = []
    for s in range(0, l, chunk_size):
        dts = dt[:, s : s + chunk_size]
        c = dts.shape[1]
        d, u = decay[:, :c], states[:, :c]
        torch.mul(dts.cumsum(1)[..., None], A, out=d).exp_()
        torch.mul((dts * x[:, s : s + c])[..., None], B[:, s : s + c, None, :], out=u)
        u.div_(d).cumsum_(1).add_(h[:, None]).mul_(d)
        ys.append(torch.matmul(u, C[:, s : s + c, :, None])[..., 0])
        h.copy_(u[:, -1])
    return torch.cat(ys, dim=1)


def _chunk_states_log_depth(decay, u, h):
    """States of one chunk by recursive doubling. decay, u: (b, c, e, n); h: (b, e, n) -> (b, c, e, n)."""
    c, k = decay.shape[1], 1
    while k < c:
        u = torch.cat([u[:, :k], u[:, k:] + decay[:, k:] * u[:, :-k]], dim=1)
        decay = torch.cat([decay[:, :k], decay[:, k:] * decay[:, :-k]], dim=1)
        k *= 2
    return decay * h[:, None] + u


def selective_scan_step(x, dt, A, B, C, state, D=None, z=None):
    """One token. x, dt, z: (b, e); B, C: (b, n); state: (b, e, n), updated in place. Returns y: (b, e)."""
    wd = _work_dtype(x)
    xw = x.to(wd)
    dt = dt.to(wd)
    h = torch.exp(dt[..., None] * A.to(wd)) * state.to(wd) + (dt * xw)[..., None] * B.to(wd)[:, None, :]
    state.copy_(h)
    y = torch.einsum("ben,bn->be", h, C.to(wd))
    return _finish(y, xw, D, z).to(x.dtype)
