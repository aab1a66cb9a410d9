"""One-token selective state update for decode: state <- exp(dt A) state + dt x B, y = state C + D x, y *= silu(z),
with dt replaced by softplus(dt) when SOFTPLUS.

One program per (sequence, channel block); the state is read and written once, in its own dtype, and the
arithmetic is float32. Reference: ``ssmblocks.ops.selective_scan.selective_scan_step_torch``.
Shapes: x, dt, z, y: (b, e); A: (e, n); B, C: (b, n); D: (e,); state: (b, e, n), or a pool (s, e, n) with
slots: (b,), row i's state at slot slots[i]. x, dt, z, B and C may be views with any row stride (a unit last
stride), as the slices of the projections' outputs are: no copies.
"""

import triton
import triton.language as tl

from ._math import softplus


@triton.jit
def selective_scan_step_kernel(
    x,
    dt,
    A,
    B,
    C,
    D,
    z,
    state,
    slots,
    y,
    width,
    d_state,
    stride_x,
    stride_dt,
    stride_z,
    stride_b,
    stride_c,
    BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    seq, block = tl.program_id(0), tl.program_id(1)
    offs_e = block * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    mask_e, mask_n = offs_e < width, offs_n < d_state
    mask_en = mask_e[:, None] & mask_n[None, :]
    en = offs_e[:, None] * d_state + offs_n[None, :]
    x_e = tl.load(x + seq * stride_x + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    dt_e = tl.load(dt + seq * stride_dt + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt_e = softplus(dt_e)
    b_n = tl.load(B + seq * stride_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    c_n = tl.load(C + seq * stride_c + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    a_en = tl.load(A + en, mask=mask_en, other=0.0).to(tl.float32)
    slot = tl.load(slots + seq).to(tl.int64) if HAS_SLOTS else seq
    at = state + slot * width * d_state + en
    h = tl.load(at, mask=mask_en, other=0.0).to(tl.float32)
    h = tl.exp(dt_e[:, None] * a_en) * h + (dt_e * x_e)[:, None] * b_n[None, :]
    tl.store(at, h.to(state.dtype.element_ty), mask=mask_en)
    out = tl.sum(h * c_n[None, :], 1)
    if HAS_D:
        out += x_e * tl.load(D + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    if HAS_Z:
        z_e = tl.load(z + seq * stride_z + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        out *= z_e * tl.sigmoid(z_e)
    tl.store(y + seq * width + offs_e, out.to(y.dtype.element_ty), mask=mask_e)
