"""Causal depthwise 1-D convolution, channels-last, with an optional carried state."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import sequence_starts
from .pool import on_slots


def causal_conv1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """Reference: y[t, c] = bias[c] + sum_j weight[c, 0, j] * x[t - (k-1) + j, c], zero before t=0.

    x: (b, l, c); weight: (c, 1, k); bias: (c,). Returns (b, l, c).
    """
    k = weight.shape[-1]
    xp = F.pad(x, (0, 0, k - 1, 0))
    y = sum(weight[:, 0, j] * xp[:, j : j + x.shape[1]] for j in range(k))
    if bias is not None:
        y = y + bias
    return F.silu(y) if activation == "silu" else y


def causal_conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    conv_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal depthwise conv over time, computed channels-last as k shifted multiply-adds.

    x: (b, l, c); weight: (c, 1, k); bias: (c,); activation: None or "silu".
    conv_state: (b, c, k - 1) inputs preceding x[:, 0]; updated in place to the last k - 1 inputs.
    mask: (b, l) bool left padding; padded inputs are skipped, so the state carries over to the first
    real token of each row. Outputs at padded positions are unspecified.
    cu_seqlens: (s + 1,) int boundaries of packed sequences (b = 1; no state, no mask): each sequence's
    first k - 1 outputs read zeros, not the sequence before it.
    Returns (b, l, c) in x's dtype.
    """
    l, k = x.shape[1], weight.shape[-1]
    if cu_seqlens is not None:
        if conv_state is not None or mask is not None:
            raise ValueError("causal_conv1d: cu_seqlens (packed sequences) takes neither a conv_state nor a mask")
        # tap j reads t - (k - 1 - j): zero it where that lies before t's own sequence
        first = sequence_starts(cu_seqlens.to(x.device), l)
        t = torch.arange(l, device=x.device)
        taps = [(t - (k - 1 - j) >= first)[:, None].to(x.dtype) for j in range(k)]
        full = F.pad(x, (0, 0, k - 1, 0))
        y = sum(full[:, j : j + l] * weight[:, 0, j].to(x.dtype) * taps[j] for j in range(k))
        y = y if bias is None else y + bias.to(x.dtype)
        return F.silu(y) if activation == "silu" else y
    if conv_state is None:
        if mask is not None:
            x = x * mask[..., None]
        full = F.pad(x, (0, 0, k - 1, 0))  # (b, k - 1 + l, c), zeros before the first token
    else:
        full = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)
        if mask is not None:
            full = _state_next_to_real_tokens(full, (~mask).sum(1), k)
        conv_state.copy_(full[:, full.shape[1] - (k - 1) :].transpose(1, 2))
    taps = weight[:, 0].to(x.dtype)  # (c, k)
    y = full[:, :l] * taps[:, 0] if bias is None else torch.addcmul(bias.to(x.dtype), full[:, :l], taps[:, 0])
    for j in range(1, k):
        y.addcmul_(full[:, j : j + l], taps[:, j])
    return F.silu(y) if activation == "silu" else y


def causal_conv1d_step_torch(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token of ``causal_conv1d``. x: (b, c); conv_state: (b, c, k - 1) the preceding inputs, shifted in
    place to end with x; weight: (c, 1, k); bias: (c,). Returns (b, c) in x's dtype.

    With ``state_indices`` (b,) of distinct slots, conv_state is a pool (s, c, k - 1) and row i reads and
    shifts conv_state[state_indices[i]]; the other slots are left as they are.
    """
    if state_indices is not None:
        def step(rows):
            return causal_conv1d_step_torch(x, rows, weight, bias, activation)

        return on_slots(conv_state, state_indices, x.shape[0], step)
    window = torch.cat([conv_state.to(x.dtype), x[:, :, None]], dim=-1)  # (b, c, k)
    conv_state.copy_(window[:, :, 1:])
    y = (window * weight[:, 0].to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return F.silu(y) if activation == "silu" else y


def _state_next_to_real_tokens(full: torch.Tensor, n_pad: torch.Tensor, k: int) -> torch.Tensor:
    """Move the carried state past each row's left padding: [state, pad, real] -> [0, state, real].

    full: (b, k - 1 + l, c) = state then inputs; n_pad: (b,) number of padded inputs per row.
    """
    j = torch.arange(full.shape[1], device=full.device)
    shift = n_pad[:, None]  # (b, 1)
    src = torch.where(j < shift + k - 1, j - shift, j).clamp(min=0)  # (b, k - 1 + l)
    moved = full.gather(1, src[:, :, None].expand_as(full))
    return moved.masked_fill((j < shift)[:, :, None], 0)
