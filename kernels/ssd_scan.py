"""SSD chunked scan, forward, in one pass: each program walks its chunks in order and keeps the state in registers.

One program owns a p tile of one head of one run (a sequence, or one segment of it: _segments.py). For each
chunk: y = ((C B^T) * decay) (dt x) + exp(a_cum) C S^T, then the skip D x and the gate silu(z); then the state
moves on, S <- exp(a_end) S + (dt x decayed to the chunk end)^T B. No chunk state goes to memory: the
inputs are read once and y written once (mamba_ssm's forward writes C B^T and the chunk states out and reads
them back). Reference: ``ssmblocks.ops.ssd.ssd_chunked`` and its ``_finish``.
Shapes: x, z, y: (t, h, p); dt: (t, h); B, C: (t, g, n); D: (h,) or (h, p); starts, ends: (r, h, p, n) float32.
"""

import triton
import triton.language as tl

from ._ssd_common import causal_decay, chunk_dt, chunk_tokens, mm, run_chunks


@triton.jit
def ssd_scan_fwd_kernel(
    x, dt, dt_bias, A, B, C, D, z, starts, y, ends, chunk_table, chunk_cu, cu_seqlens,
    seq_len, chunks_per_seq, heads, head_dim, ngroups, group_heads, d_state, seg_chunks, segments, dt_min, dt_max,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_START: tl.constexpr, VARLEN: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Writes y over run r's tokens and ends[r] = the state after the run; BLOCK_N covers d_state."""
    r, head, p_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = tl.arange(0, CHUNK)
    offs_p = p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p, mask_n = offs_p < head_dim, offs_n < d_state
    mask_pn = mask_p[:, None] & mask_n[None, :]
    at = r * heads * head_dim * d_state + head * head_dim * d_state + offs_p[:, None] * d_state + offs_n[None, :]
    if HAS_START:
        state = tl.load(starts + at, mask=mask_pn, other=0.0)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    grp = head // group_heads
    a_head = tl.load(A + head).to(tl.float32)
    if HAS_D:
        if D_PER_P:
            d_skip = tl.load(D + head * head_dim + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
        else:
            d_skip = tl.load(D + head).to(tl.float32)
    first, count = run_chunks(chunk_cu, r, chunks_per_seq, seg_chunks, segments, VARLEN)
    for i in range(count):
        start, end = chunk_tokens(chunk_table, cu_seqlens, first + i, seq_len, chunks_per_seq, CHUNK, VARLEN)
        tok = start + offs_c
        mask_c = tok < end
        dt_c, _ = chunk_dt(dt, dt_bias, head, heads, tok, mask_c, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
        a_cum = tl.cumsum(dt_c * a_head, 0)
        a_end = tl.sum(dt_c * a_head, 0)
        bc_rows = tok[:, None] * ngroups * d_state + grp * d_state + offs_n[None, :]
        mask_cn = mask_c[:, None] & mask_n[None, :]
        c_c = tl.load(C + bc_rows, mask=mask_cn, other=0.0)
        b_c = tl.load(B + bc_rows, mask=mask_cn, other=0.0)
        rows = tok[:, None] * heads * head_dim + head * head_dim + offs_p[None, :]
        mask_cp = mask_c[:, None] & mask_p[None, :]
        x_c = tl.load(x + rows, mask=mask_cp, other=0.0).to(tl.float32)

        scores = mm(c_c, tl.trans(b_c), DOT_DTYPE) * causal_decay(a_cum, CHUNK) * dt_c[None, :]
        out = mm(scores, x_c, DOT_DTYPE) + mm(c_c, tl.trans(state), DOT_DTYPE) * tl.exp(a_cum)[:, None]
        if HAS_D:
            out += x_c * d_skip
        if HAS_Z:
            z_c = tl.load(z + rows, mask=mask_cp, other=0.0).to(tl.float32)
            out = out * z_c * tl.sigmoid(z_c)
        tl.store(y + rows, out.to(y.dtype.element_ty), mask=mask_cp)

        u = x_c * (dt_c * tl.exp(a_end - a_cum))[:, None]  # (c, p): dt x, decayed to the chunk end
        state = state * tl.exp(a_end) + mm(tl.trans(u), b_c, DOT_DTYPE)
    tl.store(ends + at, state, mask=mask_pn)
