"""SSD chunk scan, backward: the gradients that one chunk's outputs and end state send to its inputs.

With g = dL/dy before the gate, u = dt x, a = the cumulative log decay and S, dS a chunk's start state and
end-state gradient:
    du = ((C B^T) * decay)^T g + exp(a_end - a) B dS^T                        -> dx, and dt through u
    dC = ((g u^T) * decay) B + exp(a) g S,   dB = ((g u^T) * decay)^T C + exp(a_end - a) u dS
The gradient of each step's log decay dt_k A is formed as sums that do not cancel, so the dots can take the
inputs' dtype: with M = (g u^T) * (C B^T) * decay, the gradient of the log decay between j and i,
    dd_k = sum_{i >= k > j} M_ij + sum_{i >= k} g_i . exp(a_i) (C S)_i + sum_{i < k} u_i . du_state_i + d_a_end
(the intra-chunk terms, the start state's share, the end state's share, the passing's share). The first
kernel owns one chunk of one head; the second one chunk of one group and sums over its heads, so dB and dC
are written once, without atomics. Reference: autograd through ``ssmblocks.ops.ssd.ssd_ref``.
Shapes: x, z, dy: (t, h, p); dt: (t, h); B, C: (t, g, n); states, dstates: (k, h, p, n); d_a_end: (k, h).
"""

import triton
import triton.language as tl

from ._ssd_common import causal_decay, chunk_dt, chunk_tokens, mm


@triton.jit
def ssd_scan_bwd_dx_kernel(
    x, dt, dt_bias, A, B, C, D, z, dy, states, dstates, d_a_end, dx, ddt, dz, dA, dD, ddt_bias,
    chunk_table, cu_seqlens,
    seq_len, chunks_per_seq, heads, head_dim, ngroups, group_heads, d_state, dt_min, dt_max,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
    VARLEN: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Writes dx, dz and ddt (before the bias) of one chunk of one head; adds into dA, dD (h, p), ddt_bias."""
    k, head = tl.program_id(0), tl.program_id(1)
    start, end = chunk_tokens(chunk_table, cu_seqlens, k, seq_len, chunks_per_seq, CHUNK, VARLEN)
    offs_c = tl.arange(0, CHUNK)
    offs_p = tl.arange(0, BLOCK_P)
    tok = start + offs_c
    mask_c = tok < end
    grp = head // group_heads
    a_head = tl.load(A + head).to(tl.float32)
    dt_c, dt_slope = chunk_dt(dt, dt_bias, head, heads, tok, mask_c, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
    a_cum = tl.cumsum(dt_c * a_head, 0)
    a_end = tl.sum(dt_c * a_head, 0)

    cb = tl.zeros((CHUNK, CHUNK), tl.float32)
    y_state = tl.zeros((CHUNK, BLOCK_P), tl.float32)
    du_state = tl.zeros((CHUNK, BLOCK_P), tl.float32)
    state_at = (k * heads + head) * head_dim * d_state
    for n0 in range(0, d_state, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_cn = mask_c[:, None] & (offs_n[None, :] < d_state)
        bc_rows = tok[:, None] * ngroups * d_state + grp * d_state + offs_n[None, :]
        c_c = tl.load(C + bc_rows, mask=mask_cn, other=0.0)
        b_c = tl.load(B + bc_rows, mask=mask_cn, other=0.0)
        np_at = state_at + offs_n[:, None] + offs_p[None, :] * d_state
        mask_np = (offs_n[:, None] < d_state) & (offs_p[None, :] < head_dim) & (start < end)  # spare chunks: none
        state = tl.load(states + np_at, mask=mask_np, other=0.0)  # (n, p)
        dstate = tl.load(dstates + np_at, mask=mask_np, other=0.0)
        cb += mm(c_c, tl.trans(b_c), DOT_DTYPE)
        y_state += mm(c_c, state, DOT_DTYPE)
        du_state += mm(b_c, dstate, DOT_DTYPE)

    mask_cp = mask_c[:, None] & (offs_p[None, :] < head_dim)
    rows = tok[:, None] * heads * head_dim + head * head_dim + offs_p[None, :]
    x_c = tl.load(x + rows, mask=mask_cp, other=0.0).to(tl.float32)
    dy_c = tl.load(dy + rows, mask=mask_cp, other=0.0).to(tl.float32)
    if HAS_Z:
        z_c = tl.load(z + rows, mask=mask_cp, other=0.0).to(tl.float32)
        z_gate = tl.sigmoid(z_c)
        g = dy_c * z_c * z_gate
    else:
        g = dy_c
    cb = cb * causal_decay(a_cum, CHUNK)
    u = x_c * dt_c[:, None]
    y_state = y_state * tl.exp(a_cum)[:, None]
    du_state = du_state * tl.exp(a_end - a_cum)[:, None]
    du = mm(tl.trans(cb), g, DOT_DTYPE) + du_state

    # dL/d(a_i - a_j), summed over the (i, j) that step k lies between: rows i >= k, then columns j < k
    m_below = tl.cumsum(mm(g, tl.trans(u), DOT_DTYPE) * cb, 0, reverse=True)
    d_a = tl.sum(tl.where(offs_c[None, :] < offs_c[:, None], m_below, 0.0), 1)
    d_a += tl.cumsum(tl.sum(g * y_state, 1), 0, reverse=True)
    u_du_state = tl.sum(u * du_state, 1)
    d_a += tl.cumsum(u_du_state, 0) - u_du_state + tl.load(d_a_end + k * heads + head)  # (c,): dL/d(dt_k A)
    ddt_c = (tl.sum(du * x_c, 1) + d_a * a_head) * dt_slope
    tl.store(ddt + tok * heads + head, ddt_c, mask=mask_c)
    tl.atomic_add(dA + head, tl.sum(d_a * dt_c, 0), sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(ddt_bias + head, tl.sum(ddt_c, 0), sem="relaxed")

    dx_c = du * dt_c[:, None]
    if HAS_Z:
        y_pre = mm(cb, u, DOT_DTYPE) + y_state  # the output before the gate
    if HAS_D:
        if D_PER_P:
            d_skip = tl.load(D + head * head_dim + offs_p, mask=offs_p < head_dim, other=0.0).to(tl.float32)
            dx_c += g * d_skip[None, :]
            if HAS_Z:
                y_pre += x_c * d_skip[None, :]
        else:
            d_skip = tl.load(D + head).to(tl.float32)
            dx_c += g * d_skip
            if HAS_Z:
                y_pre += x_c * d_skip
        tl.atomic_add(dD + head * head_dim + offs_p, tl.sum(g * x_c, 0), mask=offs_p < head_dim, sem="relaxed")
    tl.store(dx + rows, dx_c.to(dx.dtype.element_ty), mask=mask_cp)
    if HAS_Z:
        dz_c = dy_c * y_pre * z_gate * (1.0 + z_c * (1.0 - z_gate))
        tl.store(dz + rows, dz_c.to(dz.dtype.element_ty), mask=mask_cp)


@triton.jit
def ssd_scan_bwd_dbc_kernel(
    x, dt, dt_bias, A, B, C, z, dy, states, dstates, dB, dC, chunk_table, cu_seqlens,
    seq_len, chunks_per_seq, heads, head_dim, ngroups, group_heads, d_state, dt_min, dt_max,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, VARLEN: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Writes dB and dC of one chunk of one group over an n tile, summed over the group's heads."""
    k, grp, n_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, end = chunk_tokens(chunk_table, cu_seqlens, k, seq_len, chunks_per_seq, CHUNK, VARLEN)
    offs_c = tl.arange(0, CHUNK)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    tok = start + offs_c
    mask_c = tok < end
    mask_cn = mask_c[:, None] & (offs_n[None, :] < d_state)
    bc_rows = tok[:, None] * ngroups * d_state + grp * d_state + offs_n[None, :]
    c_c = tl.load(C + bc_rows, mask=mask_cn, other=0.0)
    b_c = tl.load(B + bc_rows, mask=mask_cn, other=0.0)
    mask_cp = mask_c[:, None] & (offs_p[None, :] < head_dim)
    mask_pn = (offs_p[:, None] < head_dim) & (offs_n[None, :] < d_state) & (start < end)  # spare chunks: none
    d_c = tl.zeros((CHUNK, BLOCK_N), tl.float32)
    d_b = tl.zeros((CHUNK, BLOCK_N), tl.float32)
    for r in range(group_heads):
        head = grp * group_heads + r
        dt_c, _ = chunk_dt(dt, dt_bias, head, heads, tok, mask_c, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
        a_cum = tl.cumsum(dt_c * tl.load(A + head).to(tl.float32), 0)
        a_end = tl.sum(dt_c * tl.load(A + head).to(tl.float32), 0)
        rows = tok[:, None] * heads * head_dim + head * head_dim + offs_p[None, :]
        u = tl.load(x + rows, mask=mask_cp, other=0.0).to(tl.float32) * dt_c[:, None]
        g = tl.load(dy + rows, mask=mask_cp, other=0.0).to(tl.float32)
        if HAS_Z:
            z_c = tl.load(z + rows, mask=mask_cp, other=0.0).to(tl.float32)
            g = g * z_c * tl.sigmoid(z_c)
        pn_at = (k * heads + head) * head_dim * d_state + offs_p[:, None] * d_state + offs_n[None, :]
        state = tl.load(states + pn_at, mask=mask_pn, other=0.0)
        dstate = tl.load(dstates + pn_at, mask=mask_pn, other=0.0)
        gu = mm(g, tl.trans(u), DOT_DTYPE) * causal_decay(a_cum, CHUNK)  # (c, c)
        d_c += mm(gu, b_c, DOT_DTYPE) + mm(g * tl.exp(a_cum)[:, None], state, DOT_DTYPE)
        d_b += mm(tl.trans(gu), c_c, DOT_DTYPE) + mm(u * tl.exp(a_end - a_cum)[:, None], dstate, DOT_DTYPE)
    tl.store(dC + bc_rows, d_c.to(dC.dtype.element_ty), mask=mask_cn)
    tl.store(dB + bc_rows, d_b.to(dB.dtype.element_ty), mask=mask_cn)
