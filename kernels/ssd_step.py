"""The one-token SSD (Mamba2) state update for decode through Triton, the state updated in place.

Reference: ``ssmblocks.ops.ssd.ssd_step_torch`` (same arguments and results; float32 arithmetic, the state
stored back in its own dtype, y from the float32 new state):
    state <- exp(dt A) state + dt x B^T;   y = state C + D x;   y *= silu(z)
Shapes: x, z, y: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n) with h / g heads per group; D: (h,) or (h, p);
state: (b, h, p, n), contiguous, or a pool (s, h, p, n) with slots: (b,), row i's state at slot slots[i].
"""

import torch
import triton
import triton.language as tl

from ssmblocks.ops.pool import state_rows


@triton.jit
def ssd_step_kernel(
    x, dt, A, B, C, D, z, state, slots, y, heads, head_dim, group_heads, d_state,
    stride_xb, stride_dtb, stride_bb, stride_cb, stride_zb,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
):  # fmt: skip
    """One (row, head, block of p): the whole d_state in one tile, so y is reduced here."""
    row, head, pblk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p, mask_n = offs_p < head_dim, offs_n < d_state
    grp = head // group_heads
    dt_h = tl.load(dt + row * stride_dtb + head).to(tl.float32)
    decay = tl.exp(dt_h * tl.load(A + head).to(tl.float32))
    xv = tl.load(x + row * stride_xb + head * head_dim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    bv = tl.load(B + row * stride_bb + grp * d_state + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    cv = tl.load(C + row * stride_cb + grp * d_state + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    slot = tl.load(slots + row).to(tl.int64) if HAS_SLOTS else row
    cells = state + ((slot * heads + head) * head_dim + offs_p[:, None]) * d_state + offs_n[None, :]
    mask = mask_p[:, None] & mask_n[None, :]
    new = tl.load(cells, mask=mask, other=0.0).to(tl.float32) * decay + (dt_h * xv)[:, None] * bv[None, :]
    tl.store(cells, new.to(state.dtype.element_ty), mask=mask)
    out = tl.sum(new * cv[None, :], 1)
    if HAS_D:
        if D_PER_P:
            d = tl.load(D + head * head_dim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        else:
            d = tl.load(D + head).to(tl.float32)
        out += d * xv
    if HAS_Z:
        zv = tl.load(z + row * stride_zb + head * head_dim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        out = out * zv * tl.sigmoid(zv)
    tl.store(y + (row * heads + head) * head_dim + offs_p, out.to(y.dtype.element_ty), mask=mask_p)


def packed_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with every dimension after the first packed (only the batch stride free, as in a slice of a wider
    row), else a copy; None and empty tensors stay as they are."""
    if t is None or t.numel() == 0 or t[0].is_contiguous():
        return t
    return t.contiguous()


@torch.library.custom_op("ssmblocks_triton::ssd_step", mutates_args=("state",))
def ssd_step_op(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    state_indices: torch.Tensor | None,
) -> torch.Tensor:
    """y: (b, h, p) in x's dtype; state (or its slots state_indices) updated in place."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    x, dt, B, C, z = (packed_rows(t) for t in (x, dt, B, C, z))
    D = None if D is None else D.contiguous()
    y = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    block_n = triton.next_power_of_2(n)
    block_p = min(triton.next_power_of_2(p), max(1, 4096 // block_n))
    ssd_step_kernel[(b, h, triton.cdiv(p, block_p))](
        x, dt, A, B, C, D, z, state, state_indices, y, h, p, h // g, n,
        x.stride(0), dt.stride(0), B.stride(0), C.stride(0), 0 if z is None else z.stride(0),
        BLOCK_P=block_p, BLOCK_N=block_n, HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2,
        HAS_Z=z is not None, HAS_SLOTS=state_indices is not None,
    )  # fmt: skip
    return y


@ssd_step_op.register_fake
def _(x, dt, A, B, C, state, D, z, state_indices):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def ssd_step_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ssd_step_torch`` on the kernel. Returns y: (b, h, p); state (b, h, p, n) is updated in place, or with
    state_indices (b,) of distinct slots the pool state (s, h, p, n) at those slots. No gradient (decode)."""
    if x.dim() != 3:
        raise ValueError(f"x must be (b, h, p), got shape {tuple(x.shape)}")
    b, h, p = x.shape
    if dt.shape != (b, h) or A.shape != (h,):
        raise ValueError(f"dt must be (b, h) = {(b, h)} and A (h,); got {tuple(dt.shape)}, {tuple(A.shape)}")
    if B.dim() != 3 or B.shape[0] != b or C.shape != B.shape or h % B.shape[1]:
        raise ValueError(f"B and C must be (b, g, n) with b = {b} and g dividing h = {h}; got {tuple(B.shape)}")
    n = B.shape[2]
    rows = state_rows(state_indices, b, state)
    if state.shape != (rows, h, p, n) or not state.is_contiguous():
        raise ValueError(f"state must be contiguous (b, h, p, n) = {(rows, h, p, n)}, got {tuple(state.shape)}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be (h,) or (h, p) = ({h},) or {(h, p)}, got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    return ssd_step_op(x, dt, A, B, C, state, D, z, state_indices)
