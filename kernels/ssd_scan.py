"""SSD chunk scan, forward: each chunk's outputs from its own inputs and from its start state, in one kernel.

One program owns one chunk of one head: y = ((C B^T) * decay) (dt x) + exp(a_cum) C state^T, then the skip
D x and the gate silu(z). C B^T is formed here (mamba_ssm writes it out in a separate kernel). Reference:
``ssmblocks.ops.ssd.ssd_chunked``, steps (1) and (4), and its ``_finish``.
Shapes: x, z, y: (t, h, p); dt: (t, h); B, C: (t, g, n); states: (k, h, p, n); D: (h,) or (h, p).
"""

import triton
import triton.language as tl

from ._ssd_common import causal_decay, chunk_dt, chunk_tokens, mm


@triton.jit
def ssd_scan_fwd_kernel(
    x, dt, dt_bias, A, B, C, D, z, states, y, chunk_table, cu_seqlens,
    seq_len, chunks_per_seq, heads, head_dim, ngroups, group_heads, d_state, dt_min, dt_max,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
    VARLEN: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    k, head = tl.program_id(0), tl.program_id(1)
    start, end = chunk_tokens(chunk_table, cu_seqlens, k, seq_len, chunks_per_seq, CHUNK, VARLEN)
    offs_c = tl.arange(0, CHUNK)
    offs_p = tl.arange(0, BLOCK_P)
    tok = start + offs_c
    mask_c = tok < end
    grp = head // group_heads
    dt_c, _ = chunk_dt(dt, dt_bias, head, heads, tok, mask_c, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
    a_cum = tl.cumsum(dt_c * tl.load(A + head).to(tl.float32), 0)

    cb = tl.zeros((CHUNK, CHUNK), tl.float32)
    y_state = tl.zeros((CHUNK, BLOCK_P), tl.float32)
    state_base = states + (k * heads + head) * head_dim * d_state
    for n0 in range(0, d_state, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_cn = mask_c[:, None] & (offs_n[None, :] < d_state)
        bc_rows = tok[:, None] * ngroups * d_state + grp * d_state + offs_n[None, :]
        c_c = tl.load(C + bc_rows, mask=mask_cn, other=0.0)
        b_c = tl.load(B + bc_rows, mask=mask_cn, other=0.0)
        state = tl.load(
            state_base + offs_n[:, None] + offs_p[None, :] * d_state,
            mask=(offs_n[:, None] < d_state) & (offs_p[None, :] < head_dim) & (start < end), other=0.0,
        )  # (n, p)
        cb += mm(c_c, tl.trans(b_c), DOT_DTYPE)
        y_state += mm(c_c, state, DOT_DTYPE)

    mask_cp = mask_c[:, None] & (offs_p[None, :] < head_dim)
    rows = tok[:, None] * heads * head_dim + head * head_dim + offs_p[None, :]
    x_c = tl.load(x + rows, mask=mask_cp, other=0.0).to(tl.float32)
    scores = cb * causal_decay(a_cum, CHUNK) * dt_c[None, :]
    out = mm(scores, x_c, DOT_DTYPE) + y_state * tl.exp(a_cum)[:, None]
    if HAS_D:
        if D_PER_P:
            d_skip = tl.load(D + head * head_dim + offs_p, mask=offs_p < head_dim, other=0.0).to(tl.float32)
            out += x_c * d_skip[None, :]
        else:
            out += x_c * tl.load(D + head).to(tl.float32)
    if HAS_Z:
        z_c = tl.load(z + rows, mask=mask_cp, other=0.0).to(tl.float32)
        out = out * z_c * tl.sigmoid(z_c)
    tl.store(y + rows, out.to(y.dtype.element_ty), mask=mask_cp)
