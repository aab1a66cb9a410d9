"""Selective scan (Mamba1) on CUDA through Triton, forward, backward and the decode step, as custom ops.

``selective_scan_triton`` computes, with dt_eff = softplus(dt + dt_bias) if dt_softplus else dt + dt_bias,
exactly ``ssmblocks.ops.selective_scan.selective_scan_ref(x, dt_eff, A, B, C, D, z, initial_state)`` (the
reference) in float32 with a float32 state. Forward: one kernel (selective_scan_fwd.py), which under autograd
also keeps each chunk's start state for the backward ((b, l / c, e, n), rounded to x's dtype: the scan itself
stays float32), one reverse kernel (selective_scan_bwd.py). Where a batch is too narrow to fill the GPU, either
kernel splits each sequence into segments (_segments.py): a carry-only launch, the carries chained, then all
segments at once. ``selective_scan_step_triton`` is ``selective_scan_step_torch`` (selective_scan_step.py).
Packed sequences (``cu_seqlens``, b = 1) run in one pass without segments, each sequence restarting its state.
Shapes: x, dt, z: (b, l, e); A: (e, n); B, C: (b, l, n); D, dt_bias: (e,); initial_state, final_state: (b, e, n),
or (s, e, n) for s packed sequences.
"""

import torch
import torch.nn.functional as F
import triton

from ssmblocks.ops.pool import state_rows

from ._packed import sequence_count, token_sequences
from ._segments import count_segments, launch_on_segments
from .selective_scan_bwd import selective_scan_bwd_kernel
from .selective_scan_fwd import selective_scan_fwd_kernel
from .selective_scan_step import selective_scan_step_kernel
from .ssd_step import packed_rows

CHUNK_SIZES = (4, 8, 16, 32, 64)
DEFAULT_CHUNK_SIZE = 16  # the backward's chunk, and the spacing of the states the forward keeps for it
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Per program, one warp: the forward walks 16 steps at a time over 8 channels; the backward walks chunk_size
# steps over 4 channels. Either splits the sequence into segments where that fills the GPU's waves better
# (_segments.py); a narrow batch the forward does not split gets fewer channels, for _FWD_MIN_PROGRAMS programs.
# H200 sweeps of benchmarks/gpu_scan.py --sweep, docs/benchmarks.md.
_FWD_CHUNK, _FWD_CHANNELS, _FWD_MIN_PROGRAMS, _FWD_WARPS = 16, 8, 2048, 1
_BWD_CHANNELS, _BWD_WARPS = 4, 1
# Sequence segments (_segments.py): programs resident per SM and the carry-only launch's time relative to the full
# launch's. Backward: ~255 registers a one-warp program (ptxas) leave 8 of 65536 per SM; its carry cost was
# fitted on B1 L16384 E5120. Forward: a lighter program; with these values the counts picked on the H200 came
# within 10 % of the best swept count on all three benchmark shapes (docs/benchmarks.md, 2026-12-03).
_BWD_PROGRAMS_PER_SM, _BWD_CARRY_COST = 8, 0.25
_FWD_PROGRAMS_PER_SM, _FWD_CARRY_COST = 16, 0.6


def prepare_dt_ref(dt, dt_bias=None, dt_softplus=False):
    """The dt preprocessing the kernels fuse: dt: (b, l, e) -> float32 (b, l, e)."""
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    return F.softplus(dt) if dt_softplus else dt


def _check(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, chunk_size):
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size={chunk_size} is not supported by the Triton selective scan, only {CHUNK_SIZES}")
    if x.dim() != 3:
        raise ValueError(f"x must be (b, l, e), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    b, l, e = x.shape
    if dt.shape != x.shape:
        raise ValueError(f"dt must be (b, l, e) = {(b, l, e)}, got {tuple(dt.shape)}")
    if A.dim() != 2 or A.shape[0] != e:
        raise ValueError(f"A must be (e, n) with e = {e}, got {tuple(A.shape)}")
    n = A.shape[1]
    if B.shape != (b, l, n) or C.shape != (b, l, n):
        raise ValueError(f"B and C must be (b, l, n) = {(b, l, n)}, got {tuple(B.shape)}, {tuple(C.shape)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and t.shape != (e,):
            raise ValueError(f"{name} must be (e,) = ({e},), got {tuple(t.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    n_seq = sequence_count(cu_seqlens, b)
    if initial_state is not None and initial_state.shape != (n_seq, e, n):
        raise ValueError(
            f"initial_state must be (s, e, n) = {(n_seq, e, n)}, one per sequence, got {tuple(initial_state.shape)}"
        )
    tensors = [t for t in (x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("all selective scan inputs must be on one device")


def _blocks(width, d_state, channels):
    """(BLOCK_E, BLOCK_N): ``channels`` (at most the width) and the state padded to a power of two."""
    return min(triton.next_power_of_2(width), channels), triton.next_power_of_2(d_state)


def _forward_steps(chunk_size, block_n):
    """Steps the forward walks an iteration: _FWD_CHUNK, fewer for large states; chunk_size divides it."""
    return max(chunk_size, min(_FWD_CHUNK, 256 // block_n))


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


@torch.library.custom_op("ssmblocks_triton::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    dt_softplus: bool,
    chunk_size: int,
    keep_states: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y: (b, l, e) in x's dtype, final_state: (s, e, n) float32 (s = b, or the packed sequences) and, for the
    backward when ``keep_states``, the state before each chunk: (b, ceil(l / c), e, n) in x's dtype (else an
    empty tensor)."""
    x, dt, A, B, C, D, z, dt_bias = _contiguous(x, dt, A, B, C, D, z, dt_bias)
    b, l, e = x.shape
    n = A.shape[1]
    block_e, block_n = _blocks(e, n, _FWD_CHANNELS)
    steps = _forward_steps(chunk_size, block_n)
    n_iter = triton.cdiv(l, steps)
    split = 1 if cu_seqlens is not None else _forward_segments(b * triton.cdiv(e, block_e), n_iter, x.device)
    while split == 1 and block_e > 1 and b * triton.cdiv(e, block_e) < _FWD_MIN_PROGRAMS:
        block_e //= 2  # a narrow batch not worth splitting: more programs of fewer channels
    blocks = triton.cdiv(e, block_e)
    seg_chunks = triton.cdiv(n_iter, split)
    segments = triton.cdiv(n_iter, seg_chunks)
    y = torch.empty_like(x)
    init = None if initial_state is None else initial_state.float().contiguous()
    if cu_seqlens is None:
        final = x.new_empty(b, e, n, dtype=torch.float32)
    else:  # an empty sequence's final state is its initial one; the others are written
        n_seq = sequence_count(cu_seqlens, b)
        final = init.clone() if init is not None else x.new_zeros(n_seq, e, n, dtype=torch.float32)
    states = x.new_empty(b, triton.cdiv(l, chunk_size) if keep_states else 0, e, n)
    seq_idx = token_sequences(cu_seqlens, l)

    def launch(starts, seg_end=None, seg_dt=None):
        selective_scan_fwd_kernel[(b, blocks, segments)](
            x, dt, dt_bias, A, B, C, D, z, starts, y, final, states, seg_end, seg_dt, cu_seqlens, seq_idx, init,
            l, e, n, seg_chunks,
            CHUNK=steps, BLOCK_E=block_e, BLOCK_N=block_n, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_START=starts is not None, STORE_STATES=keep_states,
            STATE_CHUNK=chunk_size, CARRY_ONLY=seg_end is not None, VARLEN=cu_seqlens is not None,
            HAS_SEQ_INIT=cu_seqlens is not None and init is not None, num_warps=_FWD_WARPS,
        )  # fmt: skip

    if cu_seqlens is not None:
        launch(None)
    else:
        _launch_on_segments(launch, None if init is None else init.view(b, 1, e, n), A, (b, segments, e, n), True)
    return y, final, states


@selective_scan_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, chunk_size, keep_states):
    (b, l, e), n = x.shape, A.shape[1]
    chunks = -(-l // chunk_size) if keep_states else 0
    return (
        torch.empty_like(x),
        x.new_empty(sequence_count(cu_seqlens, b), e, n, dtype=torch.float32),
        x.new_empty(b, chunks, e, n),
    )


@torch.library.custom_op("ssmblocks_triton::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    dy: torch.Tensor,
    dfinal: torch.Tensor | None,
    states: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    dt_softplus: bool,
    chunk_size: int,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state), each shaped and typed like its input;
    the gradient of an absent optional input is an empty tensor."""
    dy, dfinal, x, dt, A, B, C, D, z, dt_bias = _contiguous(dy, dfinal, x, dt, A, B, C, D, z, dt_bias)
    b, l, e = x.shape
    n = A.shape[1]
    block_e, block_n = _blocks(e, n, _BWD_CHANNELS)
    dx, ddt = torch.empty_like(x), torch.empty_like(dt)
    dz = torch.empty_like(z) if z is not None else None
    dB, dC = (torch.zeros(b, l, n, device=x.device, dtype=torch.float32) for _ in range(2))
    varlen = cu_seqlens is not None
    if initial_state is None:
        dinit = None
    elif not varlen:
        dinit = x.new_empty(b, e, n, dtype=torch.float32)
    else:  # an empty sequence passes dfinal on to its initial state; the others are written
        dinit = dfinal.float().clone() if dfinal is not None else torch.zeros_like(initial_state, dtype=torch.float32)
    n_chunks, blocks = triton.cdiv(l, chunk_size), triton.cdiv(e, block_e)
    split = 1 if varlen else _backward_segments(b * blocks, n_chunks, x.device)
    seg_chunks = triton.cdiv(n_chunks, split)
    segments = triton.cdiv(n_chunks, seg_chunks)
    seq_idx = token_sequences(cu_seqlens, l)
    seq_dfinal = None if dfinal is None or not varlen else dfinal.float().contiguous()
    seq_init = None if initial_state is None or not varlen else initial_state.float().contiguous()
    dA_part = x.new_empty(b, segments, e, n, dtype=torch.float32)
    dD_part, dbias_part = (x.new_empty(b, segments, e, dtype=torch.float32) for _ in range(2))

    def launch(carry, seg_dstate=None, seg_dt=None):
        selective_scan_bwd_kernel[(b, blocks, segments)](
            x, dt, dt_bias, A, B, C, D, z, dy, states, carry,
            dx, ddt, dz, dB, dC, dA_part, dD_part, dbias_part, dinit, seg_dstate, seg_dt,
            cu_seqlens, seq_idx, seq_init, seq_dfinal, l, e, n, seg_chunks,
            CHUNK=chunk_size, BLOCK_E=block_e, BLOCK_N=block_n, HAS_BIAS=dt_bias is not None,
            SOFTPLUS=dt_softplus, HAS_D=D is not None, HAS_Z=z is not None, HAS_CARRY=carry is not None,
            HAS_INIT=dinit is not None, CARRY_ONLY=seg_dstate is not None, VARLEN=varlen,
            HAS_SEQ_INIT=varlen and initial_state is not None, HAS_SEQ_DFINAL=seq_dfinal is not None,
            num_warps=_BWD_WARPS,
        )  # fmt: skip

    if varlen:
        launch(None)
    else:
        dlast = None if dfinal is None else dfinal.float().view(b, 1, e, n)
        _launch_on_segments(launch, dlast, A, (b, segments, e, n), forward=False)

    def like(grad, t):
        return x.new_empty(0) if t is None else grad.to(t.dtype)

    return (
        dx,
        ddt,
        dA_part.sum((0, 1)).to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        like(dD_part.sum((0, 1)), D),
        like(dz, z),
        like(dbias_part.sum((0, 1)), dt_bias),
        like(dinit, initial_state),
    )


def _forward_segments(programs, n_chunks, device):
    return count_segments(programs, n_chunks, device, _FWD_PROGRAMS_PER_SM, _FWD_CARRY_COST)


def _backward_segments(programs, n_chunks, device):
    return count_segments(programs, n_chunks, device, _BWD_PROGRAMS_PER_SM, _BWD_CARRY_COST)


def _launch_on_segments(launch, edge, A, shape, forward):
    """Segments of (b, S, e, n) states; a segment's carry decays by exp(A seg_dt), seg_dt (b, S, e) its summed dt."""

    def decay(seg_dt):
        return torch.exp(seg_dt[..., None] * A.float())

    return launch_on_segments(launch, edge, decay, shape, shape[2:3], forward, A.device)


@selective_scan_bwd.register_fake
def _(dy, dfinal, states, x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, chunk_size):
    def like(t):
        return x.new_empty(0) if t is None else torch.empty_like(t)

    return (
        torch.empty_like(x),
        torch.empty_like(dt),
        torch.empty_like(A),
        torch.empty_like(B),
        torch.empty_like(C),
        like(D),
        like(z),
        like(dt_bias),
        like(initial_state),
    )


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, chunk_size, keep_states = inputs
    if not keep_states:
        raise RuntimeError("selective_scan_fwd: a backward needs the chunk states (keep_states=True)")
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, output[2])
    ctx.flags = dt_softplus, chunk_size
    ctx.set_materialize_grads(False)  # else autograd hands the backward zeros the size of the kept states


def _backward(ctx, dy, dfinal, dstates):
    """Gradients of the inputs; the states are an auxiliary output (no gradient). dy or dfinal is None where
    that output was not used."""
    x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, states = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy
    grads = selective_scan_bwd(
        dy, dfinal, states, x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, *ctx.flags
    )
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = grads
    optional = zip((dD, dz, ddt_bias, dinit), (D, z, dt_bias, initial_state), strict=True)
    dD, dz, ddt_bias, dinit = (None if t is None else g for g, t in optional)
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit, None, None, None, None


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan of ``selective_scan_ref`` with dt preprocessed as ``prepare_dt_ref`` does.

    x, dt, z: (b, l, e); A: (e, n); B, C: (b, l, n); D, dt_bias: (e,); initial_state: (b, e, n).
    With ``cu_seqlens`` (int32, (s + 1,), b = 1) the tokens are s packed sequences, each starting from
    ``initial_state[i]`` (zero when None) with no state crossing a boundary; final_state is then (s, e, n).
    Returns (y in x's dtype, final_state float32). Non-contiguous inputs are copied.
    """
    _check(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, chunk_size)
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    keep_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, final, _ = selective_scan_fwd(*inputs, cu_seqlens, dt_softplus, chunk_size, keep_states)
    return y, final


@torch.library.custom_op("ssmblocks_triton::selective_scan_step", mutates_args=("state",))
def selective_scan_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    state_indices: torch.Tensor | None,
    dt_softplus: bool,
) -> torch.Tensor:
    """y: (b, e) in x's dtype; ``state`` (b, e, n, contiguous; or its slots state_indices) updated in place."""
    x, dt, B, C, z = (packed_rows(t) for t in (x, dt, B, C, z))
    A, D = _contiguous(A, D)
    b, e = x.shape
    block_e, block_n = _blocks(e, A.shape[1], max(1, 1024 // triton.next_power_of_2(A.shape[1])))
    y = x.new_empty(b, e)
    selective_scan_step_kernel[(b, triton.cdiv(e, block_e))](
        x,
        dt,
        A,
        B,
        C,
        D,
        z,
        state,
        state_indices,
        y,
        e,
        A.shape[1],
        x.stride(0),
        dt.stride(0),
        0 if z is None else z.stride(0),
        B.stride(0),
        C.stride(0),
        BLOCK_E=block_e,
        BLOCK_N=block_n,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_SLOTS=state_indices is not None,
        SOFTPLUS=dt_softplus,
        num_warps=4,
    )
    return y


@selective_scan_step.register_fake
def _(x, dt, A, B, C, state, D, z, state_indices, dt_softplus):
    return x.new_empty(x.shape)


def selective_scan_step_triton(x, dt, A, B, C, state, D=None, z=None, state_indices=None, *, dt_softplus=False):
    """``selective_scan_step_torch`` for a contiguous state: x, dt, z: (b, e); A: (e, n); B, C: (b, n);
    D: (e,); state (b, e, n) updated in place, or with state_indices (b,) of distinct slots the pool state
    (s, e, n) at those slots; dt through softplus when ``dt_softplus``. Returns y: (b, e) in x's dtype."""
    b, e = x.shape
    n = A.shape[-1]
    rows = state_rows(state_indices, b, state)
    if A.shape != (e, n) or B.shape != (b, n) or C.shape != (b, n) or state.shape != (rows, e, n):
        raise ValueError(
            f"selective_scan_step: x (b, e) = {(b, e)} needs A (e, n), B and C (b, n), state {(rows, e, n)}; got "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}, state {tuple(state.shape)}"
        )
    if not state.is_contiguous():
        raise ValueError("selective_scan_step: the state must be contiguous (it is updated in place)")
    return selective_scan_step(x, dt, A, B, C, state, D, z, state_indices, dt_softplus)
