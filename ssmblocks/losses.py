"""Next-token cross-entropy: the shifted targets, and the loss from the final hidden states a chunk of
tokens at a time, so the (tokens, vocab) float32 logits never exist at once."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .errors import ShapeError

IGNORE = -100


def next_token_targets(labels: torch.Tensor, shape: tuple[int, int], cu_seqlens: torch.Tensor | None = None):
    """labels (b, l) -> targets (b, l - 1): position t predicts labels[t + 1]; -100 is ignored, and packed
    sequences (cu_seqlens) never predict across a boundary. shape: the input's (batch, seqlen)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"CausalLM: labels must be a torch.Tensor (b, l), got {type(labels).__name__}")
    if labels.shape != shape:
        raise ShapeError(
            f"CausalLM: labels must have the input's shape (batch, seqlen) = {tuple(shape)}, got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"CausalLM: labels must be integer token ids (int64 or int32, -100 = ignore), got {labels.dtype}"
        )
    targets = labels[:, 1:].to(torch.int64, copy=True)  # the boundaries below leave the caller's labels be
    if cu_seqlens is not None:
        targets[:, cu_seqlens[1:-1].long() - 1] = IGNORE
    return targets


def chunked_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int | None,
) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -100.

    hidden (t, d): final hidden states; targets (t,); loss_sum(hidden chunk (c, d), targets (c,)) -> the
    chunk's summed loss (it computes the chunk's logits). With chunk_size, each chunk of that many tokens is
    computed under activation checkpointing: its logits are freed after the forward and recomputed in the
    backward, so at most one chunk's (c, vocab) logits and their gradient exist at a time. None: one chunk,
    nothing recomputed."""
    count = (targets != IGNORE).sum()
    if chunk_size is None:
        return loss_sum(hidden, targets) / count
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"CausalLM: loss_chunk_size must be a positive number of tokens or None, got {chunk_size!r}")
    chunks = zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True)
    return sum(checkpoint(loss_sum, h, y, use_reentrant=False) for h, y in chunks) / count
