"""Causal depthwise conv1d (channels-last) through Triton: forward, backward and the one-token step.

Reference: ``ssmblocks.ops.conv.causal_conv1d_torch`` / ``causal_conv1d_step_torch`` (same arguments, same
results; the kernels accumulate in float32). Shapes: x, y: (b, l, c); weight: (c, 1, k); bias: (c,);
conv_state: (b, c, k - 1), the inputs before x[:, 0]; n_pad: (b,) left-padded tokens per row (from the mask);
seq_first: (l,) for packed sequences (b = 1), the first position of each token's sequence.

Row b reads the sequence [conv_state, x[b, n_pad:]] shifted right by n_pad, so a padded prefix changes
nothing: the input tap at position src is x[src] when src >= n_pad, else conv_state[src - n_pad + k - 1]
(zero before it). Packed, the output at t reads x[src] for src >= seq_first[t] and zero before (``lo``, the
first position a tap may read: n_pad, or seq_first of each output). The backward recomputes the pre-activation
where it needs it instead of storing it.
"""

import torch
import triton
import triton.language as tl

from ssmblocks.ops.packing import sequence_starts
from ssmblocks.ops.pool import state_rows

from ._packed import sequence_count

MAX_WIDTH = 4
_BLOCK_L = 32


@triton.jit
def _tap(x, state, row_x, row_s, src, ch, mask_c, lo, seq_len, stride_l, stride_sc, K: tl.constexpr,
         HAS_STATE: tl.constexpr):  # fmt: skip
    """The input at positions src (s,) for channels ch (bc,), as float32 (s, bc), read in x's dtype; lo: the
    row's n_pad, or (s,) each output's seq_first (packed, no state)."""
    from_x = (src >= lo) & (src < seq_len)
    v = tl.load(x + row_x + src[:, None] * stride_l + ch[None, :], mask=from_x[:, None] & mask_c[None, :], other=0.0)
    if HAS_STATE:
        idx = src - lo + K - 1
        from_state = (src < lo) & (idx >= 0)
        s = tl.load(state + row_s + ch[None, :] * stride_sc + idx[:, None], mask=from_state[:, None] & mask_c[None, :])
        v = tl.where(from_state[:, None], s.to(x.dtype.element_ty), v)
    return v.to(tl.float32)


@triton.jit
def _pre_activation(x, weight, bias, state, row_x, row_s, t, ch, mask_c, lo, seq_len, stride_l, stride_sc,
                    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr):  # fmt: skip
    """bias + sum_j weight[:, j] * input[t - (k - 1) + j], float32 (s, bc)."""
    acc = tl.zeros((t.shape[0], ch.shape[0]), tl.float32)
    for j in tl.static_range(K):
        w = tl.load(weight + ch * K + j, mask=mask_c, other=0.0).to(x.dtype.element_ty).to(tl.float32)
        v = _tap(x, state, row_x, row_s, t + j - (K - 1), ch, mask_c, lo, seq_len, stride_l, stride_sc, K, HAS_STATE)
        acc += w[None, :] * v
    if HAS_BIAS:
        acc += tl.load(bias + ch, mask=mask_c, other=0.0).to(x.dtype.element_ty).to(tl.float32)[None, :]
    return acc


@triton.jit
def conv1d_fwd_kernel(
    x, weight, bias, state, n_pads, seq_first, y, final_state, seq_len, channels, stride_b, stride_l,
    K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    SILU: tl.constexpr,
):  # fmt: skip
    """y[b, t] = act(pre(t)) for one (row, block of l, block of c); the last l block also writes final_state."""
    row, blk, cblk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    ch = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < channels
    n_pad = tl.load(n_pads + row) if HAS_MASK else 0
    lo = tl.load(seq_first + t, mask=t < seq_len, other=0) if VARLEN else n_pad
    row_x, row_s = row * stride_b, row * channels * (K - 1)
    acc = _pre_activation(x, weight, bias, state, row_x, row_s, t, ch, mask_c, lo, seq_len, stride_l, K - 1,
                          K, HAS_BIAS, HAS_STATE)  # fmt: skip
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out = row * seq_len * channels + t[:, None] * channels + ch[None, :]
    tl.store(y + out, acc.to(y.dtype.element_ty), mask=(t[:, None] < seq_len) & mask_c[None, :])
    if HAS_STATE and blk == tl.num_programs(1) - 1:
        i = tl.arange(0, BLOCK_K)
        last = _tap(x, state, row_x, row_s, seq_len - (K - 1) + i, ch, mask_c, n_pad, seq_len, stride_l, K - 1,
                    K, HAS_STATE)  # fmt: skip
        dst = final_state + row_s + ch[None, :] * (K - 1) + i[:, None]
        tl.store(dst, last.to(final_state.dtype.element_ty), mask=(i[:, None] < K - 1) & mask_c[None, :])


@triton.jit
def conv1d_bwd_kernel(
    dy, x, weight, bias, state, n_pads, seq_first, dx, dweight_part, dbias_part, seq_len, channels, stride_b,
    stride_l, K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    SILU: tl.constexpr,
):  # fmt: skip
    """dx for one (row, block of l, block of c), and this block's sums for dweight and dbias.

    With g = dy * act'(pre): dx[s] = sum_j weight[:, j] g[s + k - 1 - j] for real s (zero at padding);
    dweight[:, j] = sum_t g[t] input[t - (k - 1) + j]; dbias = sum_t g[t]. Packed, the outputs t that
    read x[s] are those of s's own sequence.
    """
    row, blk, cblk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    ch = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < channels
    n_pad = tl.load(n_pads + row) if HAS_MASK else 0
    row_x, row_s = row * stride_b, row * channels * (K - 1)
    row_y = row * seq_len * channels
    dx_acc = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
    g_own = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
    for j in tl.static_range(K):
        t = s + (K - 1) - j  # the outputs that read x[s] through tap j
        lo_t = tl.load(seq_first + t, mask=t < seq_len, other=0) if VARLEN else n_pad
        valid = (t[:, None] < seq_len) & mask_c[None, :]
        if VARLEN:
            valid &= s[:, None] >= lo_t[:, None]  # packed: t reads x[s] only inside s's sequence
        g = tl.load(dy + row_y + t[:, None] * channels + ch[None, :], mask=valid, other=0.0).to(tl.float32)
        if SILU:
            pre = _pre_activation(x, weight, bias, state, row_x, row_s, t, ch, mask_c, lo_t, seq_len, stride_l,
                                  K - 1, K, HAS_BIAS, HAS_STATE)  # fmt: skip
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        w = tl.load(weight + ch * K + j, mask=mask_c, other=0.0).to(x.dtype.element_ty).to(tl.float32)
        dx_acc += w[None, :] * g
        if j == K - 1:
            g_own = g
    real = (s[:, None] >= n_pad) & (s[:, None] < seq_len) & mask_c[None, :]
    dx_acc = tl.where(real, dx_acc, 0.0)
    tl.store(dx + row_y + s[:, None] * channels + ch[None, :], dx_acc.to(dx.dtype.element_ty),
             mask=(s[:, None] < seq_len) & mask_c[None, :])  # fmt: skip
    part = (row * tl.num_programs(1) + blk) * channels
    lo = tl.load(seq_first + s, mask=s < seq_len, other=0) if VARLEN else n_pad
    for j in tl.static_range(K):
        v = _tap(x, state, row_x, row_s, s + j - (K - 1), ch, mask_c, lo, seq_len, stride_l, K - 1, K, HAS_STATE)
        tl.store(dweight_part + (part + ch) * K + j, tl.sum(g_own * v, 0), mask=mask_c)
    if HAS_BIAS:
        tl.store(dbias_part + part + ch, tl.sum(g_own, 0), mask=mask_c)


@triton.jit
def conv1d_step_kernel(
    x, state, slots, weight, bias, y, channels, stride_xb, stride_sb, stride_sc,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
):  # fmt: skip
    """One token for one (row, block of c): y = act(bias + window . weight) with window = [state, x];
    state <- window[1:]. The row's state is state[slots[row]] with HAS_SLOTS (a pool), else state[row]."""
    row, cblk = tl.program_id(0), tl.program_id(1)
    ch = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < channels
    i = tl.arange(0, BLOCK_K)
    xv = tl.load(x + row * stride_xb + ch, mask=mask_c, other=0.0)
    slot = tl.load(slots + row).to(tl.int64) if HAS_SLOTS else row
    cells = state + slot * stride_sb + ch[:, None] * stride_sc + i[None, :]
    window = tl.load(cells, mask=mask_c[:, None] & (i[None, :] < K - 1), other=0.0).to(x.dtype.element_ty)
    window = tl.where(i[None, :] == K - 1, xv[:, None], window)  # (bc, bk): the k inputs this token reads
    shifted = tl.load(cells + 1, mask=mask_c[:, None] & (i[None, :] < K - 2), other=0.0).to(x.dtype.element_ty)
    shifted = tl.where(i[None, :] == K - 2, xv[:, None], shifted)  # window[:, 1:], the new state
    w = tl.load(weight + ch[:, None] * K + i[None, :], mask=mask_c[:, None] & (i[None, :] < K), other=0.0)
    acc = tl.sum(window.to(tl.float32) * w.to(x.dtype.element_ty).to(tl.float32), 1)
    if HAS_BIAS:
        acc += tl.load(bias + ch, mask=mask_c, other=0.0).to(x.dtype.element_ty).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + row * channels + ch, acc.to(y.dtype.element_ty), mask=mask_c)
    tl.debug_barrier()  # every thread has read the old state before any writes the new one
    tl.store(cells, shifted.to(state.dtype.element_ty), mask=mask_c[:, None] & (i[None, :] < K - 1))


def _block_c(channels: int) -> int:
    return min(128, triton.next_power_of_2(channels))


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x (b, l, c) with unit channel stride and l and c packed (only the batch stride free), else a copy."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


@torch.library.custom_op("ssmblocks_triton::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None,
    n_pad: torch.Tensor | None,
    seq_first: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y: (b, l, c) in x's dtype; final_state: (b, c, k - 1) in conv_state's dtype (empty without a state)."""
    x = _rows_contiguous(x)
    b, l, c = x.shape
    k = weight.shape[-1]
    weight = weight.contiguous()
    state = None if conv_state is None else conv_state.contiguous()
    y = torch.empty(b, l, c, device=x.device, dtype=x.dtype)
    final = _empty(x) if state is None else torch.empty_like(state)
    grid = (b, triton.cdiv(l, _BLOCK_L), triton.cdiv(c, _block_c(c)))
    conv1d_fwd_kernel[grid](
        x, weight, bias, state, n_pad, seq_first, y, final, l, c, x.stride(0), x.stride(1),
        K=k, BLOCK_L=_BLOCK_L, BLOCK_C=_block_c(c), BLOCK_K=triton.next_power_of_2(k - 1),
        HAS_BIAS=bias is not None, HAS_STATE=state is not None, HAS_MASK=n_pad is not None,
        VARLEN=seq_first is not None, SILU=silu,
    )  # fmt: skip
    return y, final


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, conv_state, n_pad, seq_first, silu):
    final = _empty(x) if conv_state is None else torch.empty_like(conv_state)
    return torch.empty(x.shape, device=x.device, dtype=x.dtype), final


@torch.library.custom_op("ssmblocks_triton::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None,
    n_pad: torch.Tensor | None,
    seq_first: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) typed like x, weight and bias (dbias empty without a bias)."""
    x, dy = _rows_contiguous(x), dy.contiguous()
    b, l, c = x.shape
    k = weight.shape[-1]
    weight = weight.contiguous()
    state = None if conv_state is None else conv_state.contiguous()
    blocks = triton.cdiv(l, _BLOCK_L)
    dx = torch.empty(b, l, c, device=x.device, dtype=x.dtype)
    dweight_part = torch.empty(b * blocks, c, k, device=x.device, dtype=torch.float32)
    dbias_part = torch.empty(b * blocks, c, device=x.device, dtype=torch.float32) if bias is not None else None
    conv1d_bwd_kernel[(b, blocks, triton.cdiv(c, _block_c(c)))](
        dy, x, weight, bias, state, n_pad, seq_first, dx, dweight_part, dbias_part, l, c, x.stride(0), x.stride(1),
        K=k, BLOCK_L=_BLOCK_L, BLOCK_C=_block_c(c),
        HAS_BIAS=bias is not None, HAS_STATE=state is not None, HAS_MASK=n_pad is not None,
        VARLEN=seq_first is not None, SILU=silu,
    )  # fmt: skip
    dweight = dweight_part.sum(0).view(weight.shape).to(weight.dtype)
    dbias = _empty(x) if bias is None else dbias_part.sum(0).to(bias.dtype)
    return dx, dweight, dbias


@causal_conv1d_bwd.register_fake
def _(dy, x, weight, bias, conv_state, n_pad, seq_first, silu):
    dbias = _empty(x) if bias is None else torch.empty_like(bias)
    return torch.empty(x.shape, device=x.device, dtype=x.dtype), torch.empty_like(weight), dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, conv_state, n_pad, seq_first, silu = inputs
    ctx.save_for_backward(x, weight, bias, conv_state, n_pad, seq_first)
    ctx.silu = silu


def _backward(ctx, dy, dfinal):
    x, weight, bias, conv_state, n_pad, seq_first = ctx.saved_tensors
    dx, dweight, dbias = causal_conv1d_bwd(dy, x, weight, bias, conv_state, n_pad, seq_first, ctx.silu)
    return dx, dweight, None if bias is None else dbias, None, None, None, None


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ssmblocks_triton::causal_conv1d_step", mutates_args=("conv_state",))
def causal_conv1d_step_op(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    state_indices: torch.Tensor | None,
) -> torch.Tensor:
    """y: (b, c) in x's dtype; conv_state (b, c, k - 1), unit last stride (or its slots state_indices of a pool),
    shifted in place to end with x."""
    b, c = x.shape
    k = weight.shape[-1]
    y = torch.empty(b, c, device=x.device, dtype=x.dtype)
    x = x if x.stride(1) == 1 else x.contiguous()
    conv1d_step_kernel[(b, triton.cdiv(c, _block_c(c)))](
        x, conv_state, state_indices, weight.contiguous(), bias, y, c, x.stride(0), conv_state.stride(0),
        conv_state.stride(1), K=k, BLOCK_C=_block_c(c), BLOCK_K=triton.next_power_of_2(k), HAS_BIAS=bias is not None,
        SILU=silu, HAS_SLOTS=state_indices is not None,
    )  # fmt: skip
    return y


@causal_conv1d_step_op.register_fake
def _(x, conv_state, weight, bias, silu, state_indices):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> None:
    c = x.shape[-1]
    if weight.dim() != 3 or weight.shape[:2] != (c, 1) or not 2 <= weight.shape[2] <= MAX_WIDTH:
        raise ValueError(f"weight must be (c, 1, k) with c = {c}, 2 <= k <= {MAX_WIDTH}; got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"bias must be (c,) = ({c},), got {tuple(bias.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    conv_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``causal_conv1d_torch`` on the kernels: x (b, l, c) -> (b, l, c); conv_state (b, c, k - 1) updated in
    place; mask (b, l) bool left padding; cu_seqlens (s + 1,) int packed sequences (b = 1, no state, no mask),
    none reading another's inputs. Gradients reach x, weight and bias (not conv_state)."""
    _check(x, weight, bias, activation)
    if x.dim() != 3:
        raise ValueError(f"x must be (b, l, c), got shape {tuple(x.shape)}")
    b, l, c = x.shape
    k = weight.shape[-1]
    if conv_state is not None and conv_state.shape != (b, c, k - 1):
        raise ValueError(f"conv_state must be (b, c, k - 1) = {(b, c, k - 1)}, got {tuple(conv_state.shape)}")
    if mask is not None and mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be (b, l) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    seq_first = None
    if cu_seqlens is not None:
        if conv_state is not None or mask is not None:
            raise ValueError("cu_seqlens (packed sequences) takes neither a conv_state nor a mask")
        sequence_count(cu_seqlens, b)
        seq_first = sequence_starts(cu_seqlens, l)  # int32, as cu_seqlens
    n_pad = None if mask is None else (~mask).sum(1, dtype=torch.int32)
    state_in = conv_state
    if (
        conv_state is not None
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, weight, bias))
    ):
        state_in = conv_state.clone()  # the backward reads the state as it was; conv_state is overwritten below
    y, final = causal_conv1d_fwd(x, weight, bias, state_in, n_pad, seq_first, activation == "silu")
    if conv_state is not None:
        conv_state.copy_(final)
    return y


def causal_conv1d_step_triton(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """``causal_conv1d_step_torch`` on the kernel: x (b, c) -> (b, c); conv_state (b, c, k - 1) shifted in place,
    or with state_indices (b,) of distinct slots the pool conv_state (s, c, k - 1) at those slots. No gradient
    (decode)."""
    _check(x, weight, bias, activation)
    b, c = x.shape
    k = weight.shape[-1]
    rows = state_rows(state_indices, b, conv_state)
    if conv_state.shape != (rows, c, k - 1) or conv_state.stride(2) != 1:
        raise ValueError(
            f"conv_state must be (b, c, k - 1) = {(rows, c, k - 1)} with unit last stride, got "
            f"{tuple(conv_state.shape)} strides {conv_state.stride()}"
        )
    return causal_conv1d_step_op(x, conv_state, weight, bias, activation == "silu", state_indices)
