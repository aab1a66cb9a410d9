"""RMS norm and gated RMS norm over groups of channels through Triton, forward and backward.

Reference: ``ssmblocks.ops.norm.rms_norm_torch`` and ``gated_rms_norm_torch`` (same arguments and results,
computed in float32, returned in x's dtype). Shapes: x, z, y: (..., d) seen as (r, d) rows; weight: (d,);
groups of ``group_size`` channels (d / group_size groups) each normalised by their own rms.
Gate silu(z): norm_before_gate=False gives norm(x * silu(z)) * weight, True gives norm(x) * weight * silu(z).
The forward keeps 1 / rms per (row, group) in float32 for the backward.
"""

import torch
import triton
import triton.language as tl

MAX_GROUP = 8192


@triton.jit
def _load_rows(x, z, rows_idx, cols, mask, stride_x, stride_z, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    """x, the normed input v (x, or x * silu(z) when the gate comes first), the gate and sigmoid(z), float32."""
    xv = tl.load(x + rows_idx[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z + rows_idx[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(zv)
        gate = zv * sig
        v = xv if NORM_BEFORE_GATE else xv * gate
    else:
        zv = xv  # no gate: the last three values are unused
        sig = xv
        gate = xv
        v = xv
    return xv, v, zv, sig, gate


@triton.jit
def rms_norm_fwd_kernel(
    x, z, weight, y, rstd, rows, dim, group_size, stride_x, stride_z, eps,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
):  # fmt: skip
    """y for one (block of rows, group); rstd[r, group] = 1 / rms of the normed input."""
    rblk, grp = tl.program_id(0), tl.program_id(1)
    r = rblk * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = tl.arange(0, BLOCK_G)
    cols = grp * group_size + offs
    mask = (r[:, None] < rows) & (offs[None, :] < group_size)
    _, v, _, _, gate = _load_rows(x, z, r, cols, mask, stride_x, stride_z, HAS_Z, NORM_BEFORE_GATE)
    inv = tl.rsqrt(tl.sum(v * v, 1) / group_size + eps)
    w = tl.load(weight + cols, mask=offs < group_size, other=0.0).to(tl.float32)
    out = v * inv[:, None] * w[None, :]
    if HAS_Z and NORM_BEFORE_GATE:
        out = out * gate
    tl.store(y + r[:, None] * dim + cols[None, :], out.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + r * (dim // group_size) + grp, inv, mask=r < rows)


@triton.jit
def rms_norm_bwd_kernel(
    dy, x, z, weight, rstd, dx, dz, dweight_part, rows, dim, group_size, stride_x, stride_z,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
):  # fmt: skip
    """dx, dz for every BLOCK_R rows this program visits (a stride of all programs), and this program's sum
    for dweight. With xh = v / rms: dv = (dxh - xh * mean(dxh * xh)) / rms over the group."""
    pid, grp = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, BLOCK_G)
    cols = grp * group_size + offs
    mask_g = offs < group_size
    w = tl.load(weight + cols, mask=mask_g, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_G,), tl.float32)
    for start in range(pid * BLOCK_R, rows, tl.num_programs(0) * BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        mask = (r[:, None] < rows) & mask_g[None, :]
        xv, v, zv, sig, gate = _load_rows(x, z, r, cols, mask, stride_x, stride_z, HAS_Z, NORM_BEFORE_GATE)
        inv = tl.load(rstd + r * (dim // group_size) + grp, mask=r < rows, other=0.0)
        g = tl.load(dy + r[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xh = v * inv[:, None]
        if HAS_Z and NORM_BEFORE_GATE:
            dw += tl.sum(g * gate * xh, 0)
            dxh = g * gate * w[None, :]
        else:
            dw += tl.sum(g * xh, 0)
            dxh = g * w[None, :]
        dv = (dxh - xh * (tl.sum(dxh * xh, 1) / group_size)[:, None]) * inv[:, None]
        out = r[:, None] * dim + cols[None, :]
        if HAS_Z:
            dsilu = sig * (1.0 + zv * (1.0 - sig))
            if NORM_BEFORE_GATE:
                tl.store(dx + out, dv.to(dx.dtype.element_ty), mask=mask)
                tl.store(dz + out, (g * xh * w[None, :] * dsilu).to(dz.dtype.element_ty), mask=mask)
            else:
                tl.store(dx + out, (dv * gate).to(dx.dtype.element_ty), mask=mask)
                tl.store(dz + out, (dv * xv * dsilu).to(dz.dtype.element_ty), mask=mask)
        else:
            tl.store(dx + out, dv.to(dx.dtype.element_ty), mask=mask)
    tl.store(dweight_part + pid * dim + cols, dw, mask=mask_g)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., d) as (r, d) rows with unit channel stride (a view where possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(1) == 1 else t.contiguous()


def _blocks(group_size: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_G, warps): a group per row in one tile of about 4096 values."""
    block_g = triton.next_power_of_2(group_size)
    block_r = max(1, min(16, 4096 // block_g))
    return block_r, block_g, 4 if block_r * block_g <= 4096 else 8


def _programs(device: torch.device) -> int:
    """How many programs share the rows in the backward: a few per multiprocessor on CUDA."""
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


@torch.library.custom_op("ssmblocks_triton::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int, norm_before_gate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """y: x's shape and dtype; rstd: (r, d / group_size) float32."""
    d = x.shape[-1]
    x2, z2 = _rows(x), None if z is None else _rows(z)
    rows = x2.shape[0]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    rstd = torch.empty(rows, d // group_size, device=x.device, dtype=torch.float32)
    block_r, block_g, warps = _blocks(group_size)
    rms_norm_fwd_kernel[(triton.cdiv(rows, block_r), d // group_size)](
        x2, z2, weight, y, rstd, rows, d, group_size, x2.stride(0), 0 if z2 is None else z2.stride(0), eps,
        BLOCK_R=block_r, BLOCK_G=block_g, HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, num_warps=warps,
    )  # fmt: skip
    return y, rstd


@rms_norm_fwd.register_fake
def _(x, z, weight, eps, group_size, norm_before_gate):
    rows = x.numel() // x.shape[-1]
    rstd = x.new_empty(rows, x.shape[-1] // group_size, dtype=torch.float32)
    return torch.empty(x.shape, device=x.device, dtype=x.dtype), rstd


@torch.library.custom_op("ssmblocks_triton::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    group_size: int,
    norm_before_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dz, dweight) typed like x, z and weight (dz empty without a gate)."""
    d = x.shape[-1]
    x2, z2, dy2 = _rows(x), None if z is None else _rows(z), dy.reshape(-1, d).contiguous()
    rows = x2.shape[0]
    block_r, block_g, warps = _blocks(group_size)
    programs = max(1, min(triton.cdiv(rows, block_r), _programs(x.device)))
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dz = x.new_empty(0) if z is None else torch.empty(z.shape, device=z.device, dtype=z.dtype)
    dweight_part = torch.empty(programs, d, device=x.device, dtype=torch.float32)
    rms_norm_bwd_kernel[(programs, d // group_size)](
        dy2, x2, z2, weight, rstd, dx, dz, dweight_part, rows, d, group_size, x2.stride(0),
        0 if z2 is None else z2.stride(0),
        BLOCK_R=block_r, BLOCK_G=block_g, HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, num_warps=warps,
    )  # fmt: skip
    return dx, dz, dweight_part.sum(0).to(weight.dtype)


@rms_norm_bwd.register_fake
def _(dy, x, z, weight, rstd, group_size, norm_before_gate):
    dz = x.new_empty(0) if z is None else torch.empty(z.shape, device=z.device, dtype=z.dtype)
    return torch.empty(x.shape, device=x.device, dtype=x.dtype), dz, torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, z, weight, eps, group_size, norm_before_gate = inputs
    ctx.save_for_backward(x, z, weight, output[1])
    ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate


def _backward(ctx, dy, drstd):
    x, z, weight, rstd = ctx.saved_tensors
    dx, dz, dweight = rms_norm_bwd(dy, x, z, weight, rstd, ctx.group_size, ctx.norm_before_gate)
    return dx, None if z is None else dz, dweight, None, None, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, group_size: int) -> None:
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must be (d,) = ({d},), got {tuple(weight.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if group_size <= 0 or d % group_size or group_size > MAX_GROUP:
        raise ValueError(f"group_size={group_size} must divide d={d} and be at most {MAX_GROUP}")


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None) -> torch.Tensor:
    """``rms_norm_torch`` on the kernels. x: (..., d); weight: (d,). Returns x's shape and dtype."""
    group_size = group_size or x.shape[-1]
    _check(x, None, weight, group_size)
    return rms_norm_fwd(x, None, weight, float(eps), group_size, False)[0]


def gated_rms_norm_triton(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """``gated_rms_norm_torch`` on the kernels. x, z: (..., d); weight: (d,). Returns x's shape and dtype."""
    group_size = group_size or x.shape[-1]
    _check(x, z, weight, group_size)
    return rms_norm_fwd(x, z, weight, float(eps), group_size, norm_before_gate)[0]
