"""SSD (Mamba2): the selective scan with one scalar decay per head, computed chunk by chunk.

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        h: (b, h, p, n)
    y_t = h_t C_t + D * x_t,   then  y_t *= silu(z_t)

Shapes: x, z: (b, l, h, p); dt: (b, l, h) (after softplus, bias and clamping); A: (h,);
B, C: (b, l, g, n) with heads split evenly over g groups; D: (h,) or (h, p); state: (b, h, p, n).
Every function returns ``y`` in x's dtype and computes in float32 (float64 when x is float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import scan_by_length
from .pool import on_slots


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def update_state(state: torch.Tensor, decay: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One recurrence step, state <- decay * state + u * v (broadcast), written into ``state``.

    In place (two passes over the state) when the state is in the working dtype and outside autograd;
    otherwise computed out of place and copied back. Returns the new state in the working dtype.
    """
    wd = decay.dtype
    if state.dtype == wd and not (torch.is_grad_enabled() and (state.requires_grad or u.requires_grad)):
        return state.mul_(decay).addcmul_(u, v)
    new = decay * state.to(wd, copy=True) + u * v  # a copy: autograd keeps it, and state is overwritten below
    state.copy_(new)
    return new


def _finish(y, x, D, z):
    """y, x: (b, l, h, p)."""
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D).to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def ssd_ref(x, dt, A, B, C, D=None, z=None, initial_state=None):
    """The recurrence above, one time step after another. Returns (y, final_state)."""
    wd = _work_dtype(x)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    state = x.new_zeros(b, h, p, n, dtype=wd) if initial_state is None else initial_state.to(wd)
    xw, dt, A = x.to(wd), dt.to(wd), A.to(wd)
    B = B.to(wd).repeat_interleave(h // g, dim=2)  # (b, l, h, n): head i reads group i // (h / g)
    C = C.to(wd).repeat_interleave(h // g, dim=2)
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, h, 1, 1)
        state = decay * state + (dt[:, t, :, None] * xw[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = _finish(torch.stack(ys, dim=1), xw, D, z)
    return y.to(x.dtype), state


def _decay_matrix(a_cum: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a_cum: (..., c) cumulative log decays in float64 -> (..., c, c) with exp(a_cum[i] - a_cum[j]) for j <= i,
    else 0. The differences are taken in float64, so they keep full precision however long the sums."""
    c = a_cum.shape[-1]
    diff = (a_cum[..., :, None] - a_cum[..., None, :]).to(dtype)
    causal = torch.ones(c, c, dtype=torch.bool, device=a_cum.device).tril()
    return torch.exp(diff.masked_fill_(~causal, -torch.inf))


CHUNK_SIZE = 64  # the torch path's chunk when none is given: 3.5x faster than 256 on CPU (docs/benchmarks.md)


def ssd_scan_torch(
    x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size: int | None = None, cu_seqlens=None
):
    """The chunked SSD algorithm: quadratic inside a chunk, linear (state passing) across chunks.

    Per chunk of c steps: (1) outputs from inputs of the same chunk through the masked decay matrix,
    (2) each chunk's end state from its own inputs, (3) chunk start states by passing the state from
    chunk to chunk, (4) outputs from the chunk start state (3 and 4 in one loop over chunks). The tail is
    zero-padded with dt = 0, which leaves the final state unchanged. chunk_size: c (None: ``CHUNK_SIZE``);
    it changes the order of the arithmetic, never the result. Returns (y, final_state).
    cu_seqlens: (s + 1,) int boundaries of s packed sequences (b = 1), each scanned alone from
    initial_state[i] (s, h, p, n) or zeros; final_state is then (s, h, p, n). Here sequences of similar length
    run together as a right-padded batch (dt = 0 after each sequence).
    """
    if cu_seqlens is not None:
        def scan(x, dt, B, C, z, initial_state):
            return ssd_scan_torch(x, dt, A, B, C, D, z, initial_state, chunk_size)

        tokens = {"x": (x, 0.0), "dt": (dt, 0.0), "B": (B, 0.0), "C": (C, 0.0), "z": (z, 0.0)}
        return scan_by_length(scan, cu_seqlens, tokens, initial_state)
    wd = _work_dtype(x)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    c = CHUNK_SIZE if chunk_size is None else chunk_size
    pad = -l % c
    k = (l + pad) // c

    def chunks(t):  # (b, l, ...) -> (b, k, c, ...)
        t = F.pad(t.to(wd), (0, 0) * (t.dim() - 2) + (0, pad))
        return t.view(b, k, c, *t.shape[2:])

    xw = x.to(wd)
    xs = chunks(x).view(b, k, c, g, r, p)
    dts = chunks(dt).view(b, k, c, g, r)
    Bs, Cs = chunks(B), chunks(C)  # (b, k, c, g, n)
    # cumulative log decay inside each chunk, (b, k, c, g, r); float64 so that differences stay exact
    a_cum64 = (dts.double() * A.double().view(g, r)).cumsum(2)
    a_cum = a_cum64.to(wd)
    xdt = xs * dts[..., None]  # (b, k, c, g, r, p)

    # (1) intra-chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j
    decay_ij = _decay_matrix(a_cum64.permute(0, 1, 3, 4, 2), wd)  # (b, k, g, r, c, c)
    scores = torch.einsum("bkign,bkjgn->bkgij", Cs, Bs)[:, :, :, None] * decay_ij
    y = torch.einsum("bkgrij,bkjgrp->bkigrp", scores, xdt)

    # (2) each chunk's end state from its own inputs
    to_end = torch.exp((a_cum64[:, :, -1:] - a_cum64).to(wd))  # (b, k, c, g, r), <= 1
    chunk_states = torch.einsum("bkjgn,bkjgrp->bkgrpn", Bs, xdt * to_end[..., None])

    # (3) pass the state from chunk to chunk and (4) add each chunk's output from its start state:
    # y_i += exp(a_i) C_i . state_start, one chunk at a time (no (b, k, h, p, n) tensor of start states)
    state = x.new_zeros(b, g, r, p, n, dtype=wd) if initial_state is None else initial_state.to(wd).view(b, g, r, p, n)
    chunk_decay = torch.exp(a_cum[:, :, -1])[..., None, None]  # (b, k, g, r, 1, 1)
    from_start = torch.exp(a_cum)[..., None]  # (b, k, c, g, r, 1)
    for i in range(k):
        y[:, i] += torch.einsum("bign,bgrpn->bigrp", Cs[:, i], state) * from_start[:, i]
        state = torch.addcmul(chunk_states[:, i], chunk_decay[:, i], state)

    y = y.reshape(b, k * c, h, p)[:, :l]
    y = _finish(y, xw, D, z)
    return y.to(x.dtype), state.reshape(b, h, p, n)


def ssd_step_torch(x, dt, A, B, C, state, D=None, z=None, state_indices=None):
    """One token. x, z: (b, h, p); dt: (b, h); B, C: (b, g, n); state: (b, h, p, n), updated in place.

    With ``state_indices`` (b,) of distinct slots, state is a pool (s, h, p, n) and row i reads and writes
    state[state_indices[i]]; the other slots are left as they are. Returns y: (b, h, p).
    """
    if state_indices is not None:
        return on_slots(state, state_indices, x.shape[0], lambda rows: ssd_step_torch(x, dt, A, B, C, rows, D, z))
    wd = _work_dtype(x)
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    r = h // g
    xw, dt = x.to(wd), dt.to(wd)
    decay = torch.exp(dt * A.to(wd)).view(b, g, r, 1, 1)
    u = (dt[..., None] * xw).view(b, g, r, p, 1)
    new = update_state(state.view(b, g, r, p, n), decay, u, B.to(wd).view(b, g, 1, 1, n))  # heads grouped
    y = (new.view(b, g, r * p, n) @ C.to(wd).view(b, g, n, 1)).view(b, h, p)  # one matvec per group
    return _finish(y[:, None], xw[:, None], D, None if z is None else z[:, None])[:, 0].to(x.dtype)
