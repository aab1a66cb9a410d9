"""SSD (Mamba2) chunked scan on CUDA through Triton, forward and backward, as ``torch.library`` custom ops.

``ssd_chunked_triton`` computes, with dt_eff = clamp(softplus(dt + dt_bias) if dt_softplus else dt + dt_bias,
*dt_limit), exactly ``ssmblocks.ops.ssd.ssd_ref(x, dt_eff, A, B, C, D, z, initial_state)`` (the reference)
in float32 with a float32 state. Forward: two kernels (ssd_state.py passes the state across chunks,
ssd_scan.py writes the outputs); backward: the forward state pass again, then three kernels
(ssd_state.py backwards, ssd_scan_bwd.py for dx/ddt/dz and for dB/dC). The chunk start states and their
gradients are kept in x's dtype, the dots' operand dtype; every sum is float32.
Shapes: x, z: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,) or (h, p);
initial_state, final_state: (b, h, p, n), or (s, h, p, n) for s packed sequences (``cu_seqlens``).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._device import sm_count
from ._packed import sequence_count
from .ssd_scan import ssd_scan_fwd_kernel
from .ssd_scan_bwd import ssd_scan_bwd_dbc_kernel, ssd_scan_bwd_dx_kernel
from .ssd_state import ssd_state_bwd_kernel, ssd_state_fwd_kernel

CHUNK_SIZES = (16, 32, 64, 128)
DEFAULT_CHUNK_SIZE = 64
_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def prepare_dt_ref(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """The dt preprocessing the kernels fuse: dt: (b, l, h) -> float32 (b, l, h)."""
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    return (F.softplus(dt) if dt_softplus else dt).clamp(*dt_limit)


def _check(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, chunk_size):
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size={chunk_size} is not supported by the Triton SSD kernels, only {CHUNK_SIZES}")
    if x.dim() != 4:
        raise ValueError(f"x must be (b, l, h, p), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if x.dtype not in _DOT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be (b, l, h) = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (h,) = ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(f"B and C must be (b, l, g, n) with b, l = {b}, {l}; got {tuple(B.shape)}, {tuple(C.shape)}")
    if h % B.shape[2]:
        raise ValueError(f"heads ({h}) must split evenly over groups ({B.shape[2]})")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be (h,) or (h, p) = ({h},) or {(h, p)}, got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (h,):
        raise ValueError(f"dt_bias must be (h,) = ({h},), got {tuple(dt_bias.shape)}")
    n_seq = sequence_count(cu_seqlens, b)
    if initial_state is not None and initial_state.shape != (n_seq, h, p, B.shape[3]):
        raise ValueError(
            f"initial_state must be {(n_seq, h, p, B.shape[3])} (one per sequence), got {tuple(initial_state.shape)}"
        )
    tensors = [t for t in (x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("all SSD inputs must be on one device")


class _Layout:
    """Where the chunks lie: a batch of equal lengths, or the packed sequences of ``cu_seqlens``."""

    def __init__(self, x, B, cu_seqlens, chunk_size):
        b, l, self.heads, self.head_dim = x.shape
        self.ngroups, self.d_state = B.shape[2], B.shape[3]
        self.chunk = chunk_size
        self.seq_len = l
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.n_seq = cu_seqlens.numel() - 1
            self.chunks_per_seq = 0
            # packed: sum_s ceil(len_s / c) <= ceil(l / c) + s chunks; the spare ones are empty (start = end = l)
            self.n_chunks = triton.cdiv(l, chunk_size) + self.n_seq
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            self.chunk_cu = F.pad(torch.cumsum((lengths + chunk_size - 1) // chunk_size, 0), (1, 0))
            ks = torch.arange(self.n_chunks, device=x.device)
            seq = torch.searchsorted(self.chunk_cu[1:], ks, right=True).clamp_(max=self.n_seq - 1)
            start = cu_seqlens[seq].long() + (ks - self.chunk_cu[seq]) * chunk_size
            start = torch.where(ks < self.chunk_cu[-1], start, l)
            self.chunk_table = torch.stack((seq, start), 1).to(torch.int32).contiguous()
            self.chunk_cu = self.chunk_cu.to(torch.int32)
            self.cu_seqlens = cu_seqlens
        else:
            self.n_seq = b
            self.chunks_per_seq = triton.cdiv(l, chunk_size)
            self.n_chunks = b * self.chunks_per_seq
            self.chunk_table = self.chunk_cu = self.cu_seqlens = x.new_empty(0, dtype=torch.int32)
        self.group_heads = self.heads // self.ngroups
        self.block_p = max(16, triton.next_power_of_2(self.head_dim))
        self.block_n = min(64, max(16, triton.next_power_of_2(self.d_state)))
        self.warps = 4 if chunk_size <= 64 else 8
        # the dx kernel holds three (c, p) float32 tiles and two (c, c): on 4 warps at chunk 64 it spills ~1.9 KB
        # a thread (ptxas for sm_90), on 8 none; 8 warps took 14-18 % off the SSD fwd+bwd on the H200
        self.dx_warps = 8 if chunk_size >= 64 else 4
        # software-pipeline stages that fit the shared memory with float32 tiles or wide heads
        self.stages = 1 if x.dtype == torch.float32 or self.block_p > 64 else 2

    def args(self):
        """The kernels' common scalar arguments, in their order."""
        return (self.seq_len, self.chunks_per_seq, self.heads, self.head_dim, self.ngroups, self.group_heads,
                self.d_state)

    def tables(self):
        return self.chunk_table, self.chunk_cu, self.cu_seqlens


def _state_grid(lay, device):
    """(grid, BLOCK_P, BLOCK_N) of the state passes: one program per sequence, head and (BLOCK_P, BLOCK_N) tile.

    A tile spans the whole state up to 128 wide, so each chunk's x is read once rather than once per tile, where
    that still gives every SM a program; else it is lay.block_n wide. H200, bf16, SSD fwd / fwd+bwd: B4 L4096 H64
    N128 0.505 / 3.19 -> 0.428 / 2.90 ms with the wide tile; B1 L16384 (64 wide programs) 0.655 -> 0.761 ms fwd.
    """
    block_p = min(lay.block_p, 64)
    p_tiles = triton.cdiv(lay.head_dim, block_p)
    block_n = min(128, max(lay.block_n, triton.next_power_of_2(lay.d_state)))
    if lay.n_seq * lay.heads * p_tiles * triton.cdiv(lay.d_state, block_n) < sm_count(device):
        block_n = lay.block_n
    return (lay.n_seq, lay.heads, p_tiles * triton.cdiv(lay.d_state, block_n)), block_p, block_n


def _state_pass(x, dt, dt_bias, A, B, initial_state, lay, dt_softplus, dt_min, dt_max):
    """states: (k, h, p, n) in x's dtype, the state before each chunk; final: (s, h, p, n) float32."""
    states = x.new_empty(lay.n_chunks, lay.heads, lay.head_dim, lay.d_state)
    final = x.new_empty(lay.n_seq, lay.heads, lay.head_dim, lay.d_state, dtype=torch.float32)
    grid, block_p, block_n = _state_grid(lay, x.device)
    init = None if initial_state is None else initial_state.float().contiguous()
    ssd_state_fwd_kernel[grid](
        x, dt, dt_bias, A, B, init, states, final, *lay.tables(), *lay.args(), dt_min, dt_max,
        CHUNK=lay.chunk, BLOCK_P=block_p, BLOCK_N=block_n, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, HAS_INIT=init is not None, VARLEN=lay.varlen, DOT_DTYPE=_DOT_DTYPES[x.dtype],
        num_warps=4,
    )
    return states, final


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


@torch.library.custom_op("ssmblocks_triton::ssd_chunk_scan_fwd", mutates_args=())
def ssd_chunk_scan_fwd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
    dt_softplus: bool, dt_min: float, dt_max: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y: (b, l, h, p) in x's dtype, final_state: (s, h, p, n) float32."""
    x, dt, A, B, C, D, z, dt_bias = _contiguous(x, dt, A, B, C, D, z, dt_bias)
    lay = _Layout(x, B, cu_seqlens, chunk_size)
    states, final = _state_pass(x, dt, dt_bias, A, B, initial_state, lay, dt_softplus, dt_min, dt_max)
    y = torch.empty_like(x)
    ssd_scan_fwd_kernel[(lay.n_chunks, lay.heads)](
        x, dt, dt_bias, A, B, C, D, z, states, y, lay.chunk_table, lay.cu_seqlens, *lay.args(), dt_min, dt_max,
        CHUNK=lay.chunk, BLOCK_P=lay.block_p, BLOCK_N=lay.block_n, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        VARLEN=lay.varlen, DOT_DTYPE=_DOT_DTYPES[x.dtype], num_warps=lay.warps, num_stages=lay.stages + 1,
    )
    return y, final


@ssd_chunk_scan_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, dt_min, dt_max, chunk_size):
    n_seq = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = x.new_empty(n_seq, x.shape[2], x.shape[3], B.shape[3], dtype=torch.float32)
    return torch.empty_like(x), final


@torch.library.custom_op("ssmblocks_triton::ssd_chunk_scan_bwd", mutates_args=())
def ssd_chunk_scan_bwd(
    dy: torch.Tensor, dfinal: torch.Tensor | None, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
    dt_bias: torch.Tensor | None, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
    dt_softplus: bool, dt_min: float, dt_max: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state), each shaped and typed like its input;
    the gradient of an absent optional input is an empty tensor."""
    dy, dfinal, x, dt, A, B, C, D, z, dt_bias = _contiguous(dy, dfinal, x, dt, A, B, C, D, z, dt_bias)
    lay = _Layout(x, B, cu_seqlens, chunk_size)
    states, _ = _state_pass(x, dt, dt_bias, A, B, initial_state, lay, dt_softplus, dt_min, dt_max)
    dot_dtype = _DOT_DTYPES[x.dtype]
    flags = dict(CHUNK=lay.chunk, BLOCK_N=lay.block_n, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
                 HAS_Z=z is not None, VARLEN=lay.varlen, DOT_DTYPE=dot_dtype)

    dstates = torch.empty_like(states)
    d_a_end = torch.zeros(lay.n_chunks, lay.heads, device=x.device, dtype=torch.float32)
    dinit = torch.empty(lay.n_seq, lay.heads, lay.head_dim, lay.d_state, device=x.device, dtype=torch.float32)
    grid, block_p, block_n = _state_grid(lay, x.device)
    ssd_state_bwd_kernel[grid](
        dy, z, dt, dt_bias, A, C, states, dfinal, dstates, d_a_end, dinit, *lay.tables(), *lay.args(),
        dt_min, dt_max, BLOCK_P=block_p, HAS_DFINAL=dfinal is not None, HAS_INIT=initial_state is not None,
        num_warps=4, **{**flags, "BLOCK_N": block_n},
    )

    dx, dz = torch.empty_like(x), torch.empty_like(x) if z is not None else x.new_empty(0)
    ddt = torch.empty(dt.shape, device=x.device, dtype=torch.float32)
    dA = torch.zeros(lay.heads, device=x.device, dtype=torch.float32)
    dD = torch.zeros(lay.heads, lay.head_dim, device=x.device, dtype=torch.float32)
    ddt_bias = torch.zeros(lay.heads, device=x.device, dtype=torch.float32)
    ssd_scan_bwd_dx_kernel[(lay.n_chunks, lay.heads)](
        x, dt, dt_bias, A, B, C, D, z, dy, states, dstates, d_a_end, dx, ddt, dz, dA, dD, ddt_bias,
        lay.chunk_table, lay.cu_seqlens, *lay.args(), dt_min, dt_max, BLOCK_P=lay.block_p, HAS_D=D is not None,
        D_PER_P=D is not None and D.dim() == 2, num_warps=lay.dx_warps, num_stages=lay.stages, **flags,
    )

    dB, dC = torch.empty_like(B), torch.empty_like(C)
    ssd_scan_bwd_dbc_kernel[(lay.n_chunks, lay.ngroups, triton.cdiv(lay.d_state, lay.block_n))](
        x, dt, dt_bias, A, B, C, z, dy, states, dstates, dB, dC, lay.chunk_table, lay.cu_seqlens, *lay.args(),
        dt_min, dt_max, BLOCK_P=lay.block_p, num_warps=lay.warps, num_stages=lay.stages, **flags,
    )

    dD = x.new_empty(0) if D is None else (dD if D.dim() == 2 else dD.sum(1)).to(D.dtype)
    ddt_bias = x.new_empty(0) if dt_bias is None else ddt_bias.to(dt_bias.dtype)
    dinit = x.new_empty(0) if initial_state is None else dinit.to(initial_state.dtype)
    return dx, ddt.to(dt.dtype), dA.to(A.dtype), dB, dC, dD, dz, ddt_bias, dinit


@ssd_chunk_scan_bwd.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, dt_min, dt_max, chunk_size):
    def like(t):
        return x.new_empty(0) if t is None else torch.empty_like(t)

    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), like(D), like(z), like(dt_bias), like(initial_state))


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, *flags = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    ctx.flags = flags
    ctx.set_materialize_grads(False)  # an unused final state gets no zeros (the backward skips it)


def _backward(ctx, dy, dfinal):
    """dy or dfinal is None where that output was not used."""
    x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy
    grads = ssd_chunk_scan_bwd(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, *ctx.flags)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = grads
    dD, dz, ddt_bias, dinit = (
        None if t is None else g for g, t in zip((dD, dz, ddt_bias, dinit), (D, z, dt_bias, initial_state), strict=True)
    )
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit, None, None, None, None, None


ssd_chunk_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def ssd_chunked_triton(
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
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan of ``ssd_ref`` with dt preprocessed as ``prepare_dt_ref`` does. Returns (y, final_state).

    x, z: (b, l, h, p); dt: (b, l, h) raw; A, dt_bias: (h,); B, C: (b, l, g, n); D: (h,) or (h, p).
    With ``cu_seqlens`` (int32, (s + 1,), b = 1) the tokens are s packed sequences, each starting from
    ``initial_state[i]`` (zero when None) with no state crossing a boundary; final_state is (s, h, p, n).
    y is in x's dtype, final_state float32. Non-contiguous inputs are copied.
    """
    _check(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, chunk_size)
    dt_min, dt_max = (float(v) for v in dt_limit)
    return ssd_chunk_scan_fwd(
        x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, dt_min, dt_max, chunk_size
    )
