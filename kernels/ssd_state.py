"""SSD state passing: each chunk's start state forward, and each chunk's end-state gradient backward.

One program owns a (p, n) tile of one head of one sequence and walks its chunks in order, so the chunk
states of mamba_ssm's chunk-state and state-passing kernels come out of one pass. Reference: the state
recurrence of ``ssmblocks.ops.ssd.ssd_chunked``, steps (2) and (3).
Shapes: x, dy, z: (t, h, p); dt: (t, h); B, C: (t, g, n); states: (k, h, p, n); init, final: (s, h, p, n).
"""

import triton
import triton.language as tl

from ._ssd_common import chunk_dt, chunk_tokens, mm, seq_chunks


@triton.jit
def ssd_state_fwd_kernel(
    x, dt, dt_bias, A, B, init, states, final, chunk_table, chunk_cu, cu_seqlens,
    seq_len, chunks_per_seq, heads, head_dim, ngroups, group_heads, d_state, dt_min, dt_max,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_INIT: tl.constexpr, VARLEN: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Writes states[k] = the state before chunk k and final[s] = the state after sequence s."""
    s, head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_tiles = tl.cdiv(d_state, BLOCK_N)
    offs_p = (tile // n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (tile % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, CHUNK)
    mask_pn = (offs_p[:, None] < head_dim) & (offs_n[None, :] < d_state)
    pn = offs_p[:, None] * d_state + offs_n[None, :]
    hpn = heads * head_dim * d_state
    grp = head // group_heads
    a_head = tl.load(A + head).to(tl.float32)
    if HAS_INIT:
        state = tl.load(init + s * hpn + head * head_dim * d_state + pn, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    first, count = seq_chunks(chunk_cu, s, chunks_per_seq, VARLEN)
    for i in range(count):
        k = first + i
        start, end = chunk_tokens(chunk_table, cu_seqlens, k, seq_len, chunks_per_seq, CHUNK, VARLEN)
        tok = start + offs_c
        mask_c = tok < end
        dt_c, _ = chunk_dt(dt, dt_bias, head, heads, tok, mask_c, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
        a_cum = tl.cumsum(dt_c * a_head, 0)
        a_end = tl.sum(dt_c * a_head, 0)
        tl.store(states + k * hpn + head * head_dim * d_state + pn, state.to(states.dtype.element_ty), mask=mask_pn)
        x_c = tl.load(
            x + tok[:, None] * heads * head_dim + head * head_dim + offs_p[None, :],
            mask=mask_c[:, None] & (offs_p[None, :] < head_dim), other=0.0,
        ).to(tl.float32)
        b_c = tl.load(
            B + tok[:, None] * ngroups * d_state + grp * d_state + offs_n[None, :],
            mask=mask_c[:, None] & (offs_n[None, :] < d_state), other=0.0,
        )
        u = x_c * (dt_c * tl.exp(a_end - a_cum))[:, None]  # (c, p): dt x, decayed to the chunk end
        state = state * tl.exp(a_end) + mm(tl.trans(u), b_c, DOT_DTYPE)
    tl.store(final + s * hpn + head * head_dim * d_state + pn, state, mask=mask_pn)


@triton.jit
def ssd_state_bwd_kernel(
    dy, z, dt, dt_bias, A, C, states, dfinal, dstates, d_a_end, dinit, chunk_table, chunk_cu, cu_seqlens,
    seq_len, chunks_per_seq, heads, head_dim, ngroups, group_heads, d_state, dt_min, dt_max,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Walks the chunks backwards: dstates[k] = dL/d(state after chunk k), d_a_end[k, h] += dL/d(chunk k's
    total log decay) through the passing, dinit[s] = dL/d(initial state of sequence s)."""
    s, head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_tiles = tl.cdiv(d_state, BLOCK_N)
    offs_p = (tile // n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (tile % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, CHUNK)
    mask_pn = (offs_p[:, None] < head_dim) & (offs_n[None, :] < d_state)
    pn = offs_p[:, None] * d_state + offs_n[None, :]
    hpn = heads * head_dim * d_state
    grp = head // group_heads
    a_head = tl.load(A + head).to(tl.float32)
    if HAS_DFINAL:
        dstate = tl.load(dfinal + s * hpn + head * head_dim * d_state + pn, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        dstate = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    first, count = seq_chunks(chunk_cu, s, chunks_per_seq, VARLEN)
    for i in range(count):
        k = first + count - 1 - i
        start, end = chunk_tokens(chunk_table, cu_seqlens, k, seq_len, chunks_per_seq, CHUNK, VARLEN)
        tok = start + offs_c
        mask_c = tok < end
        dt_c, _ = chunk_dt(dt, dt_bias, head, heads, tok, mask_c, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
        a_cum = tl.cumsum(dt_c * a_head, 0)
        a_end = tl.sum(dt_c * a_head, 0)
        at = k * hpn + head * head_dim * d_state + pn
        tl.store(dstates + at, dstate.to(dstates.dtype.element_ty), mask=mask_pn)
        state = tl.load(states + at, mask=mask_pn, other=0.0).to(tl.float32)
        tl.atomic_add(d_a_end + k * heads + head, tl.sum(tl.sum(dstate * state, 1), 0) * tl.exp(a_end), sem="relaxed")
        mask_cp = mask_c[:, None] & (offs_p[None, :] < head_dim)
        rows = tok[:, None] * heads * head_dim + head * head_dim + offs_p[None, :]
        g = tl.load(dy + rows, mask=mask_cp, other=0.0).to(tl.float32)
        if HAS_Z:
            z_c = tl.load(z + rows, mask=mask_cp, other=0.0).to(tl.float32)
            g = g * z_c * tl.sigmoid(z_c)
        c_c = tl.load(
            C + tok[:, None] * ngroups * d_state + grp * d_state + offs_n[None, :],
            mask=mask_c[:, None] & (offs_n[None, :] < d_state), other=0.0,
        )
        dstate = dstate * tl.exp(a_end) + mm(tl.trans(g * tl.exp(a_cum)[:, None]), c_c, DOT_DTYPE)
    if HAS_INIT:
        tl.store(dinit + s * hpn + head * head_dim * d_state + pn, dstate, mask=mask_pn)
