"""Attention: causal grouped-query attention with (partial) rotary embeddings and a KV cache."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..errors import check_positive
from ..state import KVCache
from ._entry import SequenceLayer
from .linear import Linear

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of each head (halves layout), leave the rest.

    x: (b, l, heads, head_dim); positions: (b, l) integer. Returns x's shape and dtype.
    """
    if rotary_dim == 0:
        return x
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32) / rotary_dim)
    angles = positions.float()[..., None] * inv_freq  # (b, l, rotary_dim / 2)
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([rot.to(x.dtype), rest], dim=-1)


class Attention(SequenceLayer):
    """Causal GQA: q_proj, k_proj, v_proj -> RoPE on the first rotary_fraction of each head -> softmax
    attention (SDPA; flash-attn's kernel on CUDA when it is installed) -> o_proj.

    x: (b, l, d_model) -> (b, l, d_model). n_heads query heads share n_kv_heads key/value heads.
    State: ``KVCache`` (see ssmblocks.state), preallocated for ``max_seqlen`` tokens and grown if needed.
    Positions count real tokens only, so a left-padded row sees the same positions as the row alone.

    Args:
        d_model: model width d.
        n_heads: query heads.
        n_kv_heads: key/value heads (must divide n_heads); None = n_heads.
        head_dim: size of each head; None = d_model / n_heads.
        rope_theta: RoPE base.
        rotary_fraction: share of each head's dims that RoPE rotates (the first ones), in [0, 1].
        bias: bias in q_proj, k_proj, v_proj and o_proj.
        device, dtype: of the parameters.
    """

    state_type = KVCache

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        rotary_fraction: float = 1.0,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        """Build the layer; the arguments are described in the class docstring."""
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        check_positive("Attention", d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads)
        if head_dim is not None:
            check_positive("Attention", head_dim=head_dim)
        if n_heads % n_kv_heads:
            raise ValueError(f"Attention: n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"Attention: n_heads={n_heads} must divide d_model={d_model} (or give head_dim)")
            head_dim = d_model // n_heads
        if not 0.0 <= rotary_fraction <= 1.0:
            raise ValueError(f"Attention: rotary_fraction must be in [0, 1], got {rotary_fraction}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.rotary_dim = int(head_dim * rotary_fraction) // 2 * 2
        kw = {"device": device, "dtype": dtype}
        self.q_proj = Linear(d_model, n_heads * head_dim, bias=bias, **kw)
        self.k_proj = Linear(d_model, n_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = Linear(d_model, n_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = Linear(n_heads * head_dim, d_model, bias=bias, **kw)

    def init_state(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None) -> KVCache:
        """Empty cache with room for ``max_seqlen`` tokens (grows by doubling when exceeded)."""
        device = self.q_proj.weight.device if device is None else device
        dtype = self.q_proj.weight.dtype if dtype is None else dtype
        cap = max_seqlen or 0
        kv = (batch_size, self.local_kv_heads, cap, self.head_dim)
        return KVCache(
            k=torch.zeros(kv, device=device, dtype=dtype),
            v=torch.zeros(kv, device=device, dtype=dtype),
            valid=torch.zeros(batch_size, cap, device=device, dtype=torch.bool),
            pos=torch.zeros(batch_size, device=device, dtype=torch.long),
            cursor=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    def state_layout(self) -> dict:
        """Shape (after batch) and dtype of each state field, for checking a state handed in."""
        kv = ((self.local_kv_heads, None, self.head_dim), None)
        return {"k": kv, "v": kv, "valid": ((None,), torch.bool), "pos": ((), None), "cursor": ((), None)}

    @property
    def width(self) -> int:
        return self.d_model

    @property
    def local_kv_heads(self) -> int:
        """The key/value heads this module computes: n_kv_heads, or a rank's share under tensor parallelism."""
        return self.n_kv_heads // self.tp_size

    def _mix(self, x: torch.Tensor, state: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        b, l, _ = x.shape
        q = self.q_proj(x).unflatten(-1, (-1, self.head_dim))  # (b, l, heads held here, p)
        k = self.k_proj(x).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim))
        real = torch.ones(b, l, dtype=torch.bool, device=x.device) if mask is None else mask
        start = 0 if state is None else state.pos[:, None]
        positions = (start + real.long().cumsum(1) - 1).clamp(min=0)  # (b, l): index among real tokens
        q = rotary(q, positions, self.rotary_dim, self.rope_theta)
        k = rotary(k, positions, self.rotary_dim, self.rope_theta)

        if state is None and mask is None:
            out = self._causal(q, k, v)
        elif state is not None and l == 1:
            out = self._decode_step(q, k, v, real, state)
        else:
            out = self._masked(q, k, v, real, state)
        return self.o_proj(out.flatten(2))

    def _masked(self, q, k, v, real: torch.Tensor, state: KVCache | None) -> torch.Tensor:
        """Attention over the cache (if any) and the new tokens, skipping padded keys.

        q: (b, l, heads, p); k, v: (b, l, kv_heads, p); real: (b, l) bool. Returns (b, l, heads, p).
        """
        l = q.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, heads, l, p)
        offset, keys_real = 0, real
        if state is not None:
            offset = state.length
            state.reserve(l)
            # keys and values as new tensors, not views of the cache, which later calls overwrite in place:
            # autograd may keep them (training through a carried state)
            k, v = torch.cat([state.k[:, :, :offset], k], dim=2), torch.cat([state.v[:, :, :offset], v], dim=2)
            state.k[:, :, offset : offset + l] = k[:, :, offset:]
            state.v[:, :, offset : offset + l] = v[:, :, offset:]
            state.valid[:, offset : offset + l] = real
            state.pos += real.sum(1)
            state.cursor += l
            keys_real = state.valid[:, : offset + l]
        query_slot = torch.arange(offset, offset + l, device=q.device)[:, None]
        key_slot = torch.arange(offset + l, device=q.device)
        allowed = (key_slot <= query_slot) & keys_real[:, None, :]  # (b, l, s)
        allowed |= key_slot == query_slot  # a padded query attends to itself only, never NaN
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)
        return out.transpose(1, 2)

    def _decode_step(self, q, k, v, real: torch.Tensor, state: KVCache) -> torch.Tensor:
        """One token per row, written at the cursor; attends over the whole (preallocated) cache with the
        valid-slot mask. Reads nothing on the host, so it can be captured in a CUDA graph.

        q: (b, 1, heads, p); k, v: (b, 1, kv_heads, p); real: (b, 1) bool. Returns (b, 1, heads, p).
        """
        if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
            state.reserve(1)  # a capture must come with a cache preallocated for every step
        slot = state.cursor[:1].clone()  # (1,); a copy, since the cursor moves on below
        keys, values = state.k, state.v
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # new tensors for autograd to keep, as the cache itself is overwritten by the next token
            keys, values = keys.index_copy(2, slot, k.transpose(1, 2)), values.index_copy(2, slot, v.transpose(1, 2))
            state.k.copy_(keys)
            state.v.copy_(values)
        else:
            keys.index_copy_(2, slot, k.transpose(1, 2))
            values.index_copy_(2, slot, v.transpose(1, 2))
        state.valid.index_copy_(1, slot, real)
        state.pos += real[:, 0]
        state.cursor += 1
        own = torch.arange(state.capacity, device=q.device) == slot
        allowed = (state.valid | own)[:, None, None, :]  # (b, 1, 1, capacity)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=allowed, enable_gqa=True)
        return out.transpose(1, 2)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Plain causal attention. q: (b, l, heads, head_dim); k, v: (b, l, kv_heads, head_dim)."""
        if _HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func

            return flash_attn_func(q, k, v, causal=True)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
            f"rotary_dim={self.rotary_dim}"
        )
