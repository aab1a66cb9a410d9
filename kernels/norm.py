"""RMS norm, gated RMS norm over groups of channels, and residual add + RMS norm through Triton, forward and
backward.

Reference: ``ssmblocks.ops.norm.rms_norm_torch``, ``gated_rms_norm_torch`` and ``add_rms_norm_torch`` (same
arguments and results, computed in float32, returned in x's dtype). Shapes: x, z, residual, y: (..., d) seen as
(r, d) rows; weight: (d,); groups of ``group_size`` channels (d / group_size groups) each normalised by their own
rms. Gate silu(z): norm_before_gate=False gives norm(x * silu(z)) * weight, True gives norm(x) * weight * silu(z).
With a residual, one pass writes summed = residual + x (residual's dtype) and y = norm(summed) * weight; the
backward adds the gradient that reaches summed from later use of the residual stream. The forward keeps 1 / rms
per (row, group) in float32 for the backward.
"""

import torch
import triton
import triton.language as tl

from ._device import sm_count

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
    x, z, residual, weight, y, summed, rstd, rows, dim, group_size, stride_x, stride_z, stride_res, eps,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """y for one (block of rows, group); rstd[r, group] = 1 / rms of the normed input. With a residual (no gate)
    the normed input is summed = residual + x, rounded to summed's dtype as stored."""
    rblk, grp = tl.program_id(0), tl.program_id(1)
    r = rblk * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = tl.arange(0, BLOCK_G)
    cols = grp * group_size + offs
    mask = (r[:, None] < rows) & (offs[None, :] < group_size)
    xv, v, _, _, gate = _load_rows(x, z, r, cols, mask, stride_x, stride_z, HAS_Z, NORM_BEFORE_GATE)
    out_offs = r[:, None] * dim + cols[None, :]
    if HAS_RESIDUAL:
        res = tl.load(residual + r[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        s = (res.to(tl.float32) + xv.to(res.dtype).to(tl.float32)).to(res.dtype)
        tl.store(summed + out_offs, s, mask=mask)
        v = s.to(tl.float32)
    inv = tl.rsqrt(tl.sum(v * v, 1) / group_size + eps)
    w = tl.load(weight + cols, mask=offs < group_size, other=0.0).to(tl.float32)
    out = v * inv[:, None] * w[None, :]
    if HAS_Z and NORM_BEFORE_GATE:
        out = out * gate
    tl.store(y + out_offs, out.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + r * (dim // group_size) + grp, inv, mask=r < rows)


@triton.jit
def rms_norm_bwd_kernel(
    dy, x, z, dsummed, weight, rstd, dx, dz, dres, dweight_part, rows, dim, group_size, stride_x, stride_z,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_DSUMMED: tl.constexpr,
):  # fmt: skip
    """dx, dz for every BLOCK_R rows this program visits (a stride of all programs), and this program's sum
    for dweight. With xh = v / rms: dv = (dxh - xh * mean(dxh * xh)) / rms over the group. With a residual (no
    gate), x is summed and dv + dsummed goes to both dx and dres (summed = residual + x)."""
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
            if HAS_DSUMMED:
                dv += tl.load(dsummed + out, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx + out, dv.to(dx.dtype.element_ty), mask=mask)
            if HAS_RESIDUAL:
                tl.store(dres + out, dv.to(dres.dtype.element_ty), mask=mask)
    tl.store(dweight_part + pid * dim + cols, dw, mask=mask_g)


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t (..., d) as (r, d) rows with unit channel stride (a view where possible); None stays None."""
    if t is None:
        return None
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(1) == 1 else t.contiguous()


def _row_stride(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _blocks(group_size: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_G, warps): a group per row in one tile of about 4096 values."""
    block_g = triton.next_power_of_2(group_size)
    block_r = max(1, min(16, 4096 // block_g))
    return block_r, block_g, 4 if block_r * block_g <= 4096 else 8


def _programs(device: torch.device) -> int:
    """How many programs share the rows in the backward: a few per multiprocessor on CUDA."""
    return 4 * sm_count(device) or 2


def _forward(x, z, residual, weight, eps, group_size, norm_before_gate):
    """(y, summed, rstd): y x's shape and dtype; summed residual's dtype (None without one); rstd (r, groups)."""
    d = x.shape[-1]
    x2, z2, res2 = _rows(x), _rows(z), _rows(residual)
    rows = x2.shape[0]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    summed = None if residual is None else torch.empty(x.shape, device=x.device, dtype=residual.dtype)
    rstd = torch.empty(rows, d // group_size, device=x.device, dtype=torch.float32)
    block_r, block_g, warps = _blocks(group_size)
    rms_norm_fwd_kernel[(triton.cdiv(rows, block_r), d // group_size)](
        x2, z2, res2, weight, y, summed, rstd, rows, d, group_size, x2.stride(0), _row_stride(z2), _row_stride(res2),
        eps, BLOCK_R=block_r, BLOCK_G=block_g, HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate,
        HAS_RESIDUAL=residual is not None, num_warps=warps,
    )  # fmt: skip
    return y, summed, rstd


def _backward_into(dx, dz, dres, dy, x, z, dsummed, weight, rstd, group_size, norm_before_gate) -> torch.Tensor:
    """Fills dx, and dz where there is a gate, dres where there is a residual (x is then summed); returns
    dweight in weight's dtype."""
    d = x.shape[-1]
    x2, z2, dy2 = _rows(x), _rows(z), dy.reshape(-1, d).contiguous()
    dsummed2 = None if dsummed is None else dsummed.reshape(-1, d).contiguous()
    rows = x2.shape[0]
    block_r, block_g, warps = _blocks(group_size)
    programs = max(1, min(triton.cdiv(rows, block_r), _programs(x.device)))
    dweight_part = torch.empty(programs, d, device=x.device, dtype=torch.float32)
    rms_norm_bwd_kernel[(programs, d // group_size)](
        dy2, x2, z2, dsummed2, weight, rstd, dx, dz, dres, dweight_part, rows, d, group_size, x2.stride(0),
        _row_stride(z2), BLOCK_R=block_r, BLOCK_G=block_g, HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate,
        HAS_RESIDUAL=dres is not None, HAS_DSUMMED=dsummed is not None, num_warps=warps,
    )  # fmt: skip
    return dweight_part.sum(0).to(weight.dtype)


def _like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh contiguous tensor of t's shape, in t's dtype or ``dtype``."""
    return torch.empty(t.shape, device=t.device, dtype=dtype or t.dtype)


@torch.library.custom_op("ssmblocks_triton::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int, norm_before_gate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """y: x's shape and dtype; rstd: (r, d / group_size) float32."""
    y, _, rstd = _forward(x, z, None, weight, eps, group_size, norm_before_gate)
    return y, rstd


@rms_norm_fwd.register_fake
def _rms_norm_fwd_fake(x, z, weight, eps, group_size, norm_before_gate):
    rows = x.numel() // x.shape[-1]
    return _like(x), x.new_empty(rows, x.shape[-1] // group_size, dtype=torch.float32)


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
    dx, dz = _like(x), x.new_empty(0) if z is None else _like(z)
    dweight = _backward_into(dx, dz, None, dy, x, z, None, weight, rstd, group_size, norm_before_gate)
    return dx, dz, dweight


@rms_norm_bwd.register_fake
def _(dy, x, z, weight, rstd, group_size, norm_before_gate):
    return _like(x), x.new_empty(0) if z is None else _like(z), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, z, weight, eps, group_size, norm_before_gate = inputs
    ctx.save_for_backward(x, z, weight, output[1])
    ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate


def _backward(ctx, dy, drstd):
    x, z, weight, rstd = ctx.saved_tensors
    dx, dz, dweight = rms_norm_bwd(dy, x, z, weight, rstd, ctx.group_size, ctx.norm_before_gate)
    return dx, None if z is None else dz, dweight, None, None, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ssmblocks_triton::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y: x's shape and dtype; summed = residual + x: residual's dtype; rstd: (r, 1) float32."""
    return _forward(x, None, residual, weight, eps, x.shape[-1], False)


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps):
    y, rstd = _rms_norm_fwd_fake(x, None, weight, eps, x.shape[-1], False)
    return y, _like(x, residual.dtype), rstd


@torch.library.custom_op("ssmblocks_triton::add_rms_norm_bwd", mutates_args=())
def add_rms_norm_bwd(
    dy: torch.Tensor, dsummed: torch.Tensor | None, summed: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual, dweight): dx in dy's dtype (y's, which is x's), dresidual in summed's (residual's), dweight
    in weight's. dsummed: the gradient reaching summed from outside the norm, if any."""
    dx, dres = _like(summed, dy.dtype), _like(summed)
    dweight = _backward_into(dx, None, dres, dy, summed, None, dsummed, weight, rstd, summed.shape[-1], False)
    return dx, dres, dweight


@add_rms_norm_bwd.register_fake
def _(dy, dsummed, summed, weight, rstd):
    return _like(summed, dy.dtype), _like(summed), torch.empty_like(weight)


def _add_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[2], output[2])  # summed, weight, rstd
    ctx.y_dtype = output[0].dtype
    ctx.set_materialize_grads(False)  # a loss of y alone hands the backward no zeros the size of summed


def _add_backward(ctx, dy, dsummed, drstd):
    """dy or dsummed is None where that output was not used."""
    summed, weight, rstd = ctx.saved_tensors
    dy = summed.new_zeros(summed.shape, dtype=ctx.y_dtype) if dy is None else dy
    dx, dres, dweight = add_rms_norm_bwd(dy, dsummed, summed, weight, rstd)
    return dx, dres, dweight, None


add_rms_norm_fwd.register_autograd(_add_backward, setup_context=_add_setup_context)


def _check(
    x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, group_size: int, residual: torch.Tensor | None = None
) -> None:
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must be (d,) = ({d},), got {tuple(weight.shape)}")
    for name, t in (("z", z), ("residual", residual)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
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


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm_torch`` on the kernels. x, residual: (..., d); weight: (d,). Returns (y, summed): y in x's
    dtype, summed = residual + x in residual's."""
    _check(x, None, weight, x.shape[-1], residual)
    y, summed, _ = add_rms_norm_fwd(x, residual, weight, float(eps))
    return y, summed
