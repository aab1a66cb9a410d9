"""Selective scan backward: one program per (sequence, channel block, segment) walks the segment's chunks
backwards.

Each chunk recomputes its states h_t from the stored chunk start state (the forward's scan), then the state
gradient g_t = dL/dh_t from the reverse recurrence g_t = a_{t+1} g_{t+1} + dy_t C_t (a second associative
scan, over the flipped rows), carrying dL/d(chunk start state) to the chunk before. With a_t h_{t-1} = h_t - u_t
no division is needed. Tiles are (c, n, e) as in the forward.

Narrow batches split the sequence into segments of ``seg_chunks`` chunks, so that there are enough programs.
A segment needs dL/d(state at its end), the carry from the segments after it. Since the carry recurrence is
linear, a first launch with CARRY_ONLY computes, per segment, the carry it passes on from a zero carry in
(``seg_dstate``) and its summed dt (``seg_dt``; the segment multiplies a carry by exp(A sum dt)); the caller
chains them (selective_scan.py), then the full launch starts each segment from its carry.
Reference: the gradients of ``ssmblocks.ops.selective_scan.selective_scan_ref``.
Shapes: x, dt, z, dy, dx, ddt, dz: (b, l, e); A: (e, n); B, C, dB, dC (float32, accumulated): (b, l, n);
states: (b, k, e, n); carry, seg_dstate: (b, S, e, n), seg_dt: (b, S, e) for S segments; dinit: (b, e, n);
dA_part: (b, S, e, n), dD_part, dbias_part: (b, S, e) per sequence and segment.
"""

import triton
import triton.language as tl

from ._math import LOG2E
from .selective_scan_fwd import first_order_combine, load_dt, load_per_sequence, sequence_edges


@triton.jit
def selective_scan_bwd_kernel(
    x,
    dt,
    dt_bias,
    A,
    B,
    C,
    D,
    z,
    dy,
    states,
    carry,
    dx,
    ddt,
    dz,
    dB,
    dC,
    dA_part,
    dD_part,
    dbias_part,
    dinit,
    seg_dstate,
    seg_dt,
    cu_seqlens,
    seq_idx,
    seq_init,
    seq_dfinal,
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
    HAS_CARRY: tl.constexpr,
    HAS_INIT: tl.constexpr,
    CARRY_ONLY: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_SEQ_INIT: tl.constexpr,
    HAS_SEQ_DFINAL: tl.constexpr,
):
    """VARLEN (b = 1, one segment): the packed sequences of the forward; seq_dfinal[s] enters at sequence s's
    last token and dinit[s] (with HAS_INIT) is written at its first."""
    seq, block, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    part = seq * tl.num_programs(2) + seg  # this program's (sequence, segment) row of the partial outputs
    offs_e = block * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, CHUNK)
    mask_e, mask_n = offs_e < width, offs_n < d_state
    mask_ne = mask_n[:, None] & mask_e[None, :]
    ne = offs_e[None, :] * d_state + offs_n[:, None]  # (n, e) offsets into an (e, n) tensor
    a_ne = tl.load(A + ne, mask=mask_ne, other=0.0).to(tl.float32)
    a_log2 = a_ne * LOG2E
    if HAS_BIAS:
        bias = tl.load(dt_bias + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_E,), tl.float32)
    if HAS_D:
        d_skip = tl.load(D + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    else:
        d_skip = tl.zeros((BLOCK_E,), tl.float32)
    if HAS_CARRY:  # never in CARRY_ONLY, which starts every segment from a zero carry
        dstate = tl.load(carry + part * width * d_state + ne, mask=mask_ne, other=0.0)
    else:
        dstate = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)  # dL/d(state after the chunk being walked)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    dD_acc = tl.zeros((BLOCK_E,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_E,), tl.float32)  # in CARRY_ONLY: the segment's summed dt
    first = (offs_c == 0)[:, None, None]
    last = (offs_c == CHUNK - 1)[:, None, None]
    n_chunks = tl.cdiv(seq_len, CHUNK)
    seg_start, seg_end = seg * seg_chunks, tl.minimum((seg + 1) * seg_chunks, n_chunks)
    for i in range(seg_end - seg_start):
        k = seg_end - 1 - i
        pos = k * CHUNK + offs_c
        tok = seq * seq_len + pos
        mask_c = pos < seq_len
        mask_ce = mask_c[:, None] & mask_e[None, :]
        mask_cn = mask_c[:, None] & mask_n[None, :]
        rows = tok[:, None] * width + offs_e[None, :]
        rows_n = tok[:, None] * d_state + offs_n[None, :]
        dt_c, slope = load_dt(dt, bias, rows, mask_ce, HAS_BIAS, SOFTPLUS)
        c_c = tl.load(C + rows_n, mask=mask_cn, other=0.0).to(tl.float32)
        decay = tl.exp2(dt_c[:, None, :] * a_log2[None, :, :])  # (c, n, e)
        decay_in = decay  # what h_{t-1} is multiplied by: 0 at a packed sequence's first token
        if VARLEN:
            seq_c, starts_here, ends_here = sequence_edges(cu_seqlens, seq_idx, pos, mask_c)
            decay_in = tl.where(starts_here[:, None, None], 0.0, decay)
        g = tl.load(dy + rows, mask=mask_ce, other=0.0).to(tl.float32)  # dL/d(gated output)
        if HAS_Z:
            z_c = tl.load(z + rows, mask=mask_ce, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z_c)
        if not CARRY_ONLY:
            x_c = tl.load(x + rows, mask=mask_ce, other=0.0).to(tl.float32)
            b_c = tl.load(B + rows_n, mask=mask_cn, other=0.0).to(tl.float32)
            start = tl.load(states + (seq * n_chunks + k) * width * d_state + ne, mask=mask_ne, other=0.0).to(
                tl.float32
            )
            u = (dt_c * x_c)[:, None, :] * b_c[:, :, None]
            h_decayed = tl.where(first, decay_in * start[None, :, :], 0.0)  # a_t h_{t-1}, so far for t = 1
            if VARLEN and HAS_SEQ_INIT:  # a sequence's first step decays its own initial state
                h_decayed += decay * load_per_sequence(seq_init, seq_c, starts_here, ne, mask_ne, width * d_state)
            _, h = tl.associative_scan((decay_in, u + h_decayed), 0, first_order_combine)
            h_decayed = h - u
            if HAS_Z:
                out = tl.sum(h * c_c[:, :, None], 1) + x_c * d_skip[None, :]
                dz_c = g * out * sig * (1.0 + z_c * (1.0 - sig))
                tl.store(dz + rows, dz_c.to(dz.dtype.element_ty), mask=mask_ce)
        if HAS_Z:
            g *= z_c * sig  # dL/d(ungated output)

        # dh_t = dy_t C_t + a_{t+1} dh_{t+1}; a_{t+1} of the chunk's last row is 1 and the carry enters there
        next_ok = (offs_c + 1 < CHUNK)[:, None] & (pos + 1 < seq_len)[:, None] & mask_e[None, :]
        dt_next, _ = load_dt(dt, bias, rows + width, next_ok, HAS_BIAS, SOFTPLUS)
        decay_next = tl.exp2(dt_next[:, None, :] * a_log2[None, :, :])
        g_c = g[:, None, :] * c_c[:, :, None] + tl.where(last, dstate[None, :, :], 0.0)
        if VARLEN:
            in_seq = pos + 1 < seq_len
            _, next_starts, _ = sequence_edges(cu_seqlens, seq_idx, pos + 1, in_seq)
            decay_next = tl.where(next_starts[:, None, None], 0.0, decay_next)
            if HAS_SEQ_DFINAL:
                g_c += load_per_sequence(seq_dfinal, seq_c, ends_here, ne, mask_ne, width * d_state)
        # a forward scan of the flipped rows: Triton's reverse scan moves every element across lanes
        _, dh = tl.associative_scan((tl.flip(decay_next, 0), tl.flip(g_c, 0)), 0, first_order_combine)
        dh = tl.flip(dh, 0)
        dstate = tl.sum(tl.where(first, decay_in * dh, 0.0), 0)
        if VARLEN and HAS_INIT:
            at = seq_c[:, None, None] * width * d_state + ne[None, :, :]
            tl.store(dinit + at, decay * dh, mask=starts_here[:, None, None] & mask_ne[None, :, :])
        if CARRY_ONLY:
            dbias_acc += tl.sum(dt_c, 0)  # zero outside mask_ce
        else:
            ddt_c = tl.sum(dh * (x_c[:, None, :] * b_c[:, :, None] + h_decayed * a_ne[None, :, :]), 1)
            dA_acc += tl.sum(dh * h_decayed * dt_c[:, None, :], 0)
            dx_c = tl.sum(dh * b_c[:, :, None], 1) * dt_c + g * d_skip[None, :]
            tl.store(dx + rows, dx_c.to(dx.dtype.element_ty), mask=mask_ce)
            ddt_c *= slope
            tl.store(ddt + rows, ddt_c.to(ddt.dtype.element_ty), mask=mask_ce)
            dbias_acc += tl.sum(tl.where(mask_ce, ddt_c, 0.0), 0)
            dD_acc += tl.sum(g * x_c, 0)
            tl.atomic_add(dB + rows_n, tl.sum(dh * (dt_c * x_c)[:, None, :], 2), mask=mask_cn, sem="relaxed")
            tl.atomic_add(dC + rows_n, tl.sum(g[:, None, :] * h, 2), mask=mask_cn, sem="relaxed")
    if CARRY_ONLY:
        tl.store(seg_dstate + part * width * d_state + ne, dstate, mask=mask_ne)
        tl.store(seg_dt + part * width + offs_e, dbias_acc, mask=mask_e)
    else:
        tl.store(dA_part + part * width * d_state + ne, dA_acc, mask=mask_ne)
        tl.store(dD_part + part * width + offs_e, dD_acc, mask=mask_e)
        tl.store(dbias_part + part * width + offs_e, dbias_acc, mask=mask_e)
        if HAS_INIT and not VARLEN:
            tl.store(dinit + seq * width * d_state + ne, dstate, mask=mask_ne & (seg == 0))
