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
) -> torch.Tensor:
    """Causal depthwise conv over time.

    x: (b, l, c); weight: (c, 1, k); bias: (c,); activation: None or "silu".
    conv_state: (b, c, k - 1) inputs preceding x[:, 0]; updated in place to the last k - 1 inputs.
    Returns (b, l, c) in x's dtype.
    """
    b, l, c = x.shape
    k = weight.shape[-1]
    xt = x.transpose(1, 2)  # (b, c, l)
    if conv_state is None:
        y = F.conv1d(xt, weight, bias, padding=k - 1, groups=c)[..., :l]
    else:
        full = torch.cat([conv_state.to(x.dtype), xt], dim=-1)  # (b, c, k - 1 + l)
        if l == 1:  # decode: one dot product per channel
            y = torch.einsum("bck,ck->bc", full, weight[:, 0]).unsqueeze(-1)
            if bias is not None:
                y = y + bias[:, None]
        else:
            y = F.conv1d(full, weight, bias, groups=c)
        conv_state.copy_(full[..., full.shape[-1] - (k - 1) :])
    y = y.transpose(1, 2)
    return F.silu(y) if activation == "silu" else y
