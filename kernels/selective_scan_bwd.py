"""Selective scan backward: one program per (sequence, channel block) walks the chunks backwards.

As in the forward, a chunk is a (c, e) tile and the program loops over the n state components. For each it
recomputes the states h_t from the stored chunk start state (the forward's scan), then the state gradient
g_t = dL/dh_t from the reverse recurrence g_t = a_{t+1} g_{t+1} + dy_t C_t (a second associative scan,
reversed), carrying dL/d(chunk start state) to the chunk before. With a_t h_{t-1} = h_t - u_t no division is
needed. The gradients of x and dt gather over n in registers; those of B and C (sums over channels) are added
atomically. Reference: the gradients of ``ssmblocks.ops.selective_scan.selective_scan_ref``.
Shapes: x, dt, z, dy, dx, ddt, dz: (b, l, e); A: (e, n); B, C, dB, dC (float32, accumulated): (b, l, n);
states: (b, k, e, n); dfinal, dinit: (b, e, n); dA_part: (b, e, n), dD_part, dbias_part: (b, e) per sequence.
"""

import triton
import triton.language as tl

from .selective_scan_fwd import first_order_combine, load_dt


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
    dfinal,
    dx,
    ddt,
    dz,
    dB,
    dC,
    dA_part,
    dD_part,
    dbias_part,
    dinit,
    seq_len,
    width,
    d_state,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    seq, block = tl.program_id(0), tl.program_id(1)
    offs_e = block * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, CHUNK)
    mask_e, mask_n = offs_e < width, offs_n < d_state
    mask_ne = mask_n[:, None] & mask_e[None, :]
    ne = offs_e[None, :] * d_state + offs_n[:, None]  # (n, e) tile of an (e, n) row-major tensor
    a_ne = tl.load(A + ne, mask=mask_ne, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(dt_bias + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_E,), tl.float32)
    if HAS_D:
        d_skip = tl.load(D + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    else:
        d_skip = tl.zeros((BLOCK_E,), tl.float32)
    if HAS_DFINAL:
        dstate = tl.load(dfinal + seq * width * d_state + ne, mask=mask_ne, other=0.0).to(tl.float32)
    else:
        dstate = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)  # dL/d(state after the chunk being walked)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    dD_acc = tl.zeros((BLOCK_E,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_E,), tl.float32)
    first = (offs_t == 0)[:, None]
    n_chunks = tl.cdiv(seq_len, CHUNK)
    for it in range(n_chunks):
        k = n_chunks - 1 - it
        pos = k * CHUNK + offs_t
        mask_t = pos < seq_len
        tok = seq * seq_len + pos
        mask_te = mask_t[:, None] & mask_e[None, :]
        rows = tok[:, None] * width + offs_e[None, :]
        dt_c, slope = load_dt(dt, bias, rows, mask_te, HAS_BIAS, SOFTPLUS)
        x_c = tl.load(x + rows, mask=mask_te, other=0.0).to(tl.float32)
        start = tl.load(states + (seq * n_chunks + k) * width * d_state + ne, mask=mask_ne, other=0.0)
        dy_c = tl.load(dy + rows, mask=mask_te, other=0.0).to(tl.float32)  # dL/d(gated output)
        if HAS_Z:
            z_c = tl.load(z + rows, mask=mask_te, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z_c)
            g = dy_c * z_c * sig  # dL/d(ungated output)
        else:
            g = dy_c
        # a_{t+1} of the chunk's last row is 1: the carried gradient enters there
        next_ok = (offs_t + 1 < CHUNK)[:, None] & (pos + 1 < seq_len)[:, None] & mask_e[None, :]
        dt_next, _ = load_dt(dt, bias, rows + width, next_ok, HAS_BIAS, SOFTPLUS)
        dtx = dt_c * x_c
        out = tl.zeros((CHUNK, BLOCK_E), tl.float32)  # the ungated output, for dz
        dh_b = tl.zeros((CHUNK, BLOCK_E), tl.float32)  # sum over n of dh B
        dh_ha = tl.zeros((CHUNK, BLOCK_E), tl.float32)  # sum over n of dh a_t h_{t-1} A
        dstate_start = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
        for i in range(d_state):
            pick = offs_n[:, None] == i
            a_i = tl.sum(tl.where(pick, a_ne, 0.0), 0)  # (e,)
            b_i = tl.load(B + tok * d_state + i, mask=mask_t, other=0.0).to(tl.float32)  # (c,)
            c_i = tl.load(C + tok * d_state + i, mask=mask_t, other=0.0).to(tl.float32)
            decay = tl.exp(dt_c * a_i[None, :])
            u = dtx * b_i[:, None]
            decay_cum, h = tl.associative_scan((decay, u), 0, first_order_combine)
            h += decay_cum * tl.sum(tl.where(pick, start, 0.0), 0)[None, :]
            if HAS_Z:
                out += h * c_i[:, None]
            carried, dh = tl.associative_scan(
                (tl.exp(dt_next * a_i[None, :]), g * c_i[:, None]), 0, first_order_combine, reverse=True
            )
            dh += carried * tl.sum(tl.where(pick, dstate, 0.0), 0)[None, :]
            dstate_start = tl.where(pick, tl.sum(tl.where(first, decay * dh, 0.0), 0)[None, :], dstate_start)
            dh_decayed = dh * (h - u)  # dh a_t h_{t-1}
            dh_b += dh * b_i[:, None]
            dh_ha += dh_decayed * a_i[None, :]
            dA_acc += tl.where(pick, tl.sum(dh_decayed * dt_c, 0)[None, :], 0.0)
            tl.atomic_add(dB + tok * d_state + i, tl.sum(dh * dtx, 1), mask=mask_t)
            tl.atomic_add(dC + tok * d_state + i, tl.sum(g * h, 1), mask=mask_t)
        dstate = dstate_start
        if HAS_Z:
            out += x_c * d_skip[None, :]
            tl.store(dz + rows, (dy_c * out * sig * (1.0 + z_c * (1.0 - sig))).to(dz.dtype.element_ty), mask=mask_te)
        tl.store(dx + rows, (dh_b * dt_c + g * d_skip[None, :]).to(dx.dtype.element_ty), mask=mask_te)
        ddt_c = (dh_b * x_c + dh_ha) * slope
        tl.store(ddt + rows, ddt_c.to(ddt.dtype.element_ty), mask=mask_te)
        dbias_acc += tl.sum(tl.where(mask_te, ddt_c, 0.0), 0)
        dD_acc += tl.sum(g * x_c, 0)
    tl.store(dA_part + seq * width * d_state + ne, dA_acc, mask=mask_ne)
    tl.store(dD_part + seq * width + offs_e, dD_acc, mask=mask_e)
    tl.store(dbias_part + seq * width + offs_e, dbias_acc, mask=mask_e)
    if HAS_INIT:
        tl.store(dinit + seq * width * d_state + ne, dstate, mask=mask_ne)
