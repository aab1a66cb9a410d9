"""Selective scan forward: one program per (sequence, channel block, segment) walks the segment's chunks in
order, the state in registers.

Inside a chunk the recurrence h_t = a_t h_{t-1} + u_t (a_t = exp(dt_t A), u_t = dt_t x_t B_t, all (n, e))
is one associative scan over the (c, n, e) tile, the chunk's start state folded into u_1 (u_1 += a_1 h_start).
Tiles are (c, n, e) so that the channels lie across the lanes and each thread holds all state components and
steps of its channels: the scan and the sums over n stay inside a thread, and the (c, e) values (dt, x, z)
are not replicated across lanes.
Only the chunk start states (when asked, for the backward) and the final state are written, never a per-step
state. Narrow batches split the sequence into segments of ``seg_chunks`` chunks: a first launch with
CARRY_ONLY gives each segment's end state from a zero start (``seg_end``) and its summed dt (``seg_dt``), the
caller chains them into each segment's start state (selective_scan.py), then the full launch runs every
segment from its start. Reference: ``ssmblocks.ops.selective_scan.selective_scan_ref``; the dt
preprocessing that ``load_dt`` fuses is ``ssmblocks.kernels.selective_scan.prepare_dt_ref``.
Packed sequences (VARLEN): a sequence's first token multiplies the state before it by 0 and adds its own
initial state, decayed, as the step's input; its last token writes the final state.
Shapes: x, dt, z, y: (b, l, e); A: (e, n); B, C: (b, l, n); D, dt_bias: (e,); final: (b, e, n); starts,
seg_end: (b, S, e, n), seg_dt: (b, S, e) for S segments; states: (b, ceil(l / s), e, n) for the backward's
chunk s.
"""

import triton
import triton.language as tl

from ._math import LOG2E, softplus


@triton.jit
def first_order_combine(a_first, u_first, a_then, u_then):
    """Compose h -> a_first h + u_first, then h -> a_then h + u_then."""
    return a_first * a_then, a_then * u_first + u_then


@triton.jit
def load_dt(dt, bias, rows, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt at ``rows`` (c, e) offsets, float32: softplus(dt + bias) as flagged (bias: (e,) float32), zero
    outside ``mask``.

    Also returns d dt_eff / d dt, (c, e): the softplus slope, or 1.
    """
    raw = tl.load(dt + rows, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[None, :]
    if SOFTPLUS:
        val = softplus(raw)
        slope = tl.sigmoid(raw)
    else:
        val = raw
        slope = tl.full(raw.shape, 1.0, tl.float32)
    return tl.where(mask, val, 0.0), slope


@triton.jit
def sequence_edges(cu_seqlens, seq_idx, pos, mask):
    """For packed tokens at ``pos`` (c,): their sequence, and whether each is its sequence's first or last token."""
    seq_c = tl.load(seq_idx + pos, mask=mask, other=0)
    starts_here = mask & (pos == tl.load(cu_seqlens + seq_c, mask=mask, other=-1))
    ends_here = mask & (pos + 1 == tl.load(cu_seqlens + seq_c + 1, mask=mask, other=-1))
    return seq_c, starts_here, ends_here


@triton.jit
def load_per_sequence(base, seq_c, rows_ok, ne, mask_ne, stride):
    """(c, n, e): row t holds base[seq_c[t]] (an (e, n) state per sequence) where rows_ok[t], else zeros."""
    at = seq_c[:, None, None] * stride + ne[None, :, :]
    return tl.load(base + at, mask=rows_ok[:, None, None] & mask_ne[None, :, :], other=0.0).to(tl.float32)


@triton.jit
def selective_scan_fwd_kernel(
    x,
    dt,
    dt_bias,
    A,
    B,
    C,
    D,
    z,
    starts,
    y,
    final,
    states,
    seg_end,
    seg_dt,
    cu_seqlens,
    seq_idx,
    seq_init,
    seq_len,
    width,
    d_state,
    seg_chunks,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_START: tl.constexpr,
    STORE_STATES: tl.constexpr,
    STATE_CHUNK: tl.constexpr,
    CARRY_ONLY: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_SEQ_INIT: tl.constexpr,
):
    """Writes y, final[b] and, when STORE_STATES, states[b, j] = the state before step j * STATE_CHUNK (the
    backward's chunk, which divides CHUNK). VARLEN (b = 1, one segment): the packed sequences of cu_seqlens,
    token t in sequence seq_idx[t], each from seq_init[s] (or zero), final[s] written at its last token."""
    seq, block, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    part = seq * tl.num_programs(2) + seg  # this program's (sequence, segment) row
    offs_e = block * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, CHUNK)
    mask_e, mask_n = offs_e < width, offs_n < d_state
    mask_ne = mask_n[:, None] & mask_e[None, :]
    ne = offs_e[None, :] * d_state + offs_n[:, None]  # (n, e) offsets into an (e, n) tensor
    a_log2 = tl.load(A + ne, mask=mask_ne, other=0.0).to(tl.float32) * LOG2E  # (n, e): exp(dt A) = exp2(dt A log2 e)
    if HAS_BIAS:
        bias = tl.load(dt_bias + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_E,), tl.float32)
    if HAS_D:
        d_skip = tl.load(D + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    if HAS_START:  # never in CARRY_ONLY, which starts every segment from zero
        state = tl.load(starts + part * width * d_state + ne, mask=mask_ne, other=0.0)
    else:
        state = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    dt_sum = tl.zeros((BLOCK_E,), tl.float32)
    first = (offs_c == 0)[:, None, None]
    last = (offs_c == CHUNK - 1)[:, None, None]
    n_chunks = tl.cdiv(seq_len, CHUNK)
    n_states = tl.cdiv(seq_len, STATE_CHUNK)
    per_chunk: tl.constexpr = CHUNK // STATE_CHUNK
    for k in range(seg * seg_chunks, tl.minimum((seg + 1) * seg_chunks, n_chunks)):
        if STORE_STATES and not CARRY_ONLY:
            tl.store(
                states + (seq * n_states + k * per_chunk) * width * d_state + ne,
                state.to(states.dtype.element_ty), mask=mask_ne,
            )
        pos = k * CHUNK + offs_c
        tok = seq * seq_len + pos
        mask_c = pos < seq_len
        mask_ce = mask_c[:, None] & mask_e[None, :]
        rows = tok[:, None] * width + offs_e[None, :]
        dt_c, _ = load_dt(dt, bias, rows, mask_ce, HAS_BIAS, SOFTPLUS)
        x_c = tl.load(x + rows, mask=mask_ce, other=0.0).to(tl.float32)
        mask_cn = mask_c[:, None] & mask_n[None, :]
        b_c = tl.load(B + tok[:, None] * d_state + offs_n[None, :], mask=mask_cn, other=0.0).to(tl.float32)
        decay = tl.exp2(dt_c[:, None, :] * a_log2[None, :, :])  # (c, n, e); 1 on padded rows
        u = (dt_c * x_c)[:, None, :] * b_c[:, :, None]
        if VARLEN:
            seq_c, starts_here, ends_here = sequence_edges(cu_seqlens, seq_idx, pos, mask_c)
            if HAS_SEQ_INIT:
                u += decay * load_per_sequence(seq_init, seq_c, starts_here, ne, mask_ne, width * d_state)
            decay = tl.where(starts_here[:, None, None], 0.0, decay)  # nothing carried across a boundary
        u += tl.where(first, decay * state[None, :, :], 0.0)
        _, h = tl.associative_scan((decay, u), 0, first_order_combine)
        state = tl.sum(tl.where(last, h, 0.0), 0)  # padded rows carry the last real state
        if CARRY_ONLY:
            dt_sum += tl.sum(dt_c, 0)  # zero outside mask_ce
        else:
            if STORE_STATES:
                for j in tl.static_range(1, per_chunk):
                    inner = tl.sum(tl.where((offs_c == j * STATE_CHUNK - 1)[:, None, None], h, 0.0), 0)
                    at = k * per_chunk + j
                    at_ok = mask_ne & (at < n_states)
                    tl.store(
                        states + (seq * n_states + at) * width * d_state + ne,
                        inner.to(states.dtype.element_ty), mask=at_ok,
                    )
            c_c = tl.load(C + tok[:, None] * d_state + offs_n[None, :], mask=mask_cn, other=0.0).to(tl.float32)
            out = tl.sum(h * c_c[:, :, None], 1)  # (c, e)
            if HAS_D:
                out += x_c * d_skip[None, :]
            if HAS_Z:
                z_c = tl.load(z + rows, mask=mask_ce, other=0.0).to(tl.float32)
                out *= z_c * tl.sigmoid(z_c)
            tl.store(y + rows, out.to(y.dtype.element_ty), mask=mask_ce)
            if VARLEN:
                at = seq_c[:, None, None] * width * d_state + ne[None, :, :]
                tl.store(final + at, h, mask=ends_here[:, None, None] & mask_ne[None, :, :])
    if CARRY_ONLY:
        tl.store(seg_end + part * width * d_state + ne, state, mask=mask_ne)
        tl.store(seg_dt + part * width + offs_e, dt_sum, mask=mask_e)
    elif not VARLEN:
        tl.store(final + seq * width * d_state + ne, state, mask=mask_ne & (seg == tl.num_programs(2) - 1))
