"""Pieces every SSD kernel shares: where a chunk lies, the fused dt preprocessing, the decay matrix, one matmul.

A chunk is ``CHUNK`` consecutive tokens of one sequence. Tokens are flattened to ``t = seq * l + pos`` for a
batch of equal lengths, or taken as they lie in a packed batch (``VARLEN``): then ``chunk_table`` (k, 2) holds
each chunk's sequence and first token, and ``chunk_cu`` (n + 1,) each sequence's first chunk.
The reference for the dt preprocessing is ``ssmblocks.kernels.ssd.prepare_dt_ref``.
"""

import triton
import triton.language as tl

from ._math import softplus


@triton.jit
def chunk_tokens(chunk_table, cu_seqlens, k, seq_len, chunks_per_seq, CHUNK: tl.constexpr, VARLEN: tl.constexpr):
    """First and one-past-last token of chunk ``k``."""
    if VARLEN:
        seq = tl.load(chunk_table + 2 * k)
        start = tl.load(chunk_table + 2 * k + 1)
        end = tl.minimum(start + CHUNK, tl.load(cu_seqlens + seq + 1))
    else:
        seq = k // chunks_per_seq
        start = seq * seq_len + (k % chunks_per_seq) * CHUNK
        end = tl.minimum(start + CHUNK, (seq + 1) * seq_len)
    return start, end


@triton.jit
def seq_chunks(chunk_cu, s, chunks_per_seq, VARLEN: tl.constexpr):
    """First chunk and chunk count of sequence ``s``."""
    if VARLEN:
        first = tl.load(chunk_cu + s)
        count = tl.load(chunk_cu + s + 1) - first
    else:
        first = s * chunks_per_seq
        count = chunks_per_seq
    return first, count


@triton.jit
def chunk_dt(dt, dt_bias, head, heads, tok, mask, dt_min, dt_max, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt of one head over a chunk, (c,) float32: clamp(softplus(dt + bias)), zero outside ``mask``.

    Also returns d dt_eff / d dt, (c,): the softplus slope where the clamp passes, else 0.
    """
    raw = tl.load(dt + tok * heads + head, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(dt_bias + head).to(tl.float32)
    if SOFTPLUS:
        val = softplus(raw)
        slope = tl.sigmoid(raw)
    else:
        val = raw
        slope = tl.full(raw.shape, 1.0, tl.float32)
    passes = (val >= dt_min) & (val <= dt_max) & mask
    val = tl.where(mask, tl.minimum(tl.maximum(val, dt_min), dt_max), 0.0)
    return val, tl.where(passes, slope, 0.0)


@triton.jit
def causal_decay(a_cum, CHUNK: tl.constexpr):
    """a_cum: (c,) cumulative log decay -> (c, c) with exp(a_cum[i] - a_cum[j]) for j <= i, else 0."""
    rows = tl.arange(0, CHUNK)
    causal = rows[:, None] >= rows[None, :]
    return tl.exp(tl.where(causal, a_cum[:, None] - a_cum[None, :], -float("inf")))


@triton.jit
def mm(a, b, DOT_DTYPE: tl.constexpr):
    """a @ b with operands in DOT_DTYPE (the inputs' dtype) and a float32 result; exact float32 for float32."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))
