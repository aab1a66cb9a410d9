"""Causal depthwise 1-D convolution, channels-last, with an optional carried state."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    conv_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal depthwise conv over time.

    x: (b, l, c); weight: (c, 1, k); bias: (c,); activation: None or "silu".
    conv_state: (b, c, k - 1) inputs preceding x[:, 0]; updated in place to the last k - 1 inputs.
    mask: (b, l) bool left padding; padded inputs are skipped, so the state carries over to the first
    real token of each row. Outputs at padded positions are unspecified.
    Returns (b, l, c) in x's dtype.
    """
    b, l, c = x.shape
    k = weight.shape[-1]
    xt = x.transpose(1, 2)  # (b, c, l)
    if conv_state is None:
        if mask is not None:
            xt = xt * mask[:, None, :]
        y = F.conv1d(xt, weight, bias, padding=k - 1, groups=c)[..., :l]
    else:
        full = torch.cat([conv_state.to(x.dtype), xt], dim=-1)  # (b, c, k - 1 + l)
        if mask is not None:
            full = _state_next_to_real_tokens(full, (~mask).sum(1), k)
        if l == 1:  # decode: one dot product per channel
            y = torch.einsum("bck,ck->bc", full, weight[:, 0]).unsqueeze(-1)
            if bias is not None:
                y = y + bias[:, None]
        else:
            y = F.conv1d(full, weight, bias, groups=c)
        conv_state.copy_(full[..., full.shape[-1] - (k - 1) :])
    y = y.transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


def _state_next_to_real_tokens(full: torch.Tensor, n_pad: torch.Tensor, k: int) -> torch.Tensor:
    """Move the carried state past each row's left padding: [state, pad, real] -> [0, state, real].

    full: (b, c, k - 1 + l) = state then inputs; n_pad: (b,) number of padded inputs per row.
    """
    j = torch.arange(full.shape[-1], device=full.device)
    shift = n_pad[:, None]  # (b, 1)
    src = torch.where(j < shift + k - 1, j - shift, j).clamp(min=0)  # (b, k - 1 + l)
    moved = full.gather(-1, src[:, None, :].expand_as(full))
    return moved.masked_fill((j < shift)[:, None, :], 0)
