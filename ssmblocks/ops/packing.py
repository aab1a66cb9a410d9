"""Masks and packed sequences, handled the same way by every layer.

Where no kernel takes packed input (batch 1, sequences laid end to end, boundaries in ``cu_seqlens``) as it
lies, it runs in groups of sequences of similar length: each group unpacked into a right-padded batch, run
through the ordinary path and packed back. Every mixer is causal, so right padding never reaches a real
position and each sequence starts from a fresh state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ShapeError


def check_cu_seqlens(cu_seqlens: torch.Tensor, x: torch.Tensor, layer: str) -> None:
    """cu_seqlens: (n + 1,) integer, starts at 0, strictly increasing, ends at x.shape[1]; x batch 1."""
    if (
        not isinstance(cu_seqlens, torch.Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.is_floating_point()
        or cu_seqlens.dtype == torch.bool
    ):
        raise ShapeError(f"{layer}: cu_seqlens must be a 1-D integer tensor (n_seqs + 1,)")
    if x.shape[0] != 1:
        raise ShapeError(f"{layer}: packed input (cu_seqlens) must have batch size 1, got {x.shape[0]}")
    if cu_seqlens.numel() < 2:
        raise ShapeError(f"{layer}: cu_seqlens needs at least 2 entries (0 and the total length)")
    if torch.compiler.is_compiling():  # a graph cannot branch on the values: assert them where they lie
        steps = cu_seqlens[1:] - cu_seqlens[:-1]
        valid = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == x.shape[1]) & (steps > 0).all()
        torch._assert_async(valid, f"{layer}: cu_seqlens must run from 0 to {x.shape[1]}, strictly increasing")
        return
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != x.shape[1]:
        raise ShapeError(
            f"{layer}: cu_seqlens must run from 0 to the packed length {x.shape[1]}, got {bounds[0]} .. {bounds[-1]}"
        )
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if min(lengths) <= 0:
        i = next(i for i, n in enumerate(lengths) if n <= 0)
        raise ShapeError(f"{layer}: cu_seqlens must be strictly increasing; sequence {i} has length {lengths[i]}")


def check_attention_mask(mask: torch.Tensor, x: torch.Tensor, layer: str) -> torch.Tensor:
    """Validate a left-padding mask (b, l), 1 = real token; return it as bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{layer}: attention_mask must be a tensor (batch, seqlen), got {type(mask).__name__}")
    if mask.shape != x.shape[:2]:
        raise ShapeError(
            f"{layer}: attention_mask has shape {tuple(mask.shape)}, expected (batch, seqlen) = {tuple(x.shape[:2])}"
        )
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ShapeError(f"{layer}: attention_mask must hold only 0 (padding) and 1 (real token)")
    mask = mask.to(device=x.device, dtype=torch.bool)
    if (mask[:, :-1] & ~mask[:, 1:]).any():
        raise ShapeError(
            f"{layer}: attention_mask must be left-padded (zeros, then ones, in every row); "
            "a real token is followed by padding"
        )
    return mask


def _length_groups(cu_seqlens: torch.Tensor) -> tuple[list[int], list[int], list[list[int]]]:
    """The packed sequences' bounds and lengths, and their indices grouped by length: each group's longest is at
    most twice its shortest."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    groups = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if not groups or lengths[i] > 2 * lengths[groups[-1][0]]:
            groups.append([])
        groups[-1].append(i)
    return bounds, lengths, groups


def _padded(t: torch.Tensor, bounds: list[int], group: list[int], fill: float) -> torch.Tensor:
    """The group's sequences of packed t (1, t, ...) as a right-padded batch (len(group), longest, ...)."""
    longest = max(bounds[i + 1] - bounds[i] for i in group)
    pad = (0, 0) * (t.dim() - 2)
    return torch.cat([F.pad(t[:, bounds[i] : bounds[i + 1]], (*pad, 0, longest - bounds[i + 1] + bounds[i]),
                            value=fill) for i in group])  # fmt: skip


def scan_by_length(scan: Callable, cu_seqlens: torch.Tensor, tokens: dict, initial_state: torch.Tensor | None):
    """Run ``scan(initial_state=..., **padded) -> (y, final)`` over packed sequences, each group of similar
    length as one right-padded batch, so the padding at most doubles the work.

    tokens: name -> (packed (1, t, ...) tensor or None, the value to pad it with); initial_state: (s, ...) or
    None. Returns y (1, t, ...) and final (s, ...), in the packed order.
    """
    bounds, lengths, groups = _length_groups(cu_seqlens)
    if len(set(lengths)) == 1:  # the pack is a batch as it lies
        batch = {k: None if t is None else t.unflatten(1, (len(lengths), -1))[0] for k, (t, _) in tokens.items()}
        y, final = scan(initial_state=initial_state, **batch)
        return y.flatten(0, 1)[None], final
    ys, finals = {}, {}
    for group in groups:
        padded = {k: None if t is None else _padded(t, bounds, group, fill) for k, (t, fill) in tokens.items()}
        y, final = scan(initial_state=None if initial_state is None else initial_state[group], **padded)
        for row, i in enumerate(group):
            ys[i], finals[i] = y[row : row + 1, : lengths[i]], final[row : row + 1]
    return torch.cat([ys[i] for i in sorted(ys)], 1), torch.cat([finals[i] for i in sorted(finals)])


def run_packed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Apply a causal ``fn(padded (n, max_len, d)) -> (n, max_len, d_out)`` to packed ``x (1, t, d)``, each
    group of sequences of similar length as one right-padded batch."""

    def stateless(initial_state, x):
        y = fn(x)
        return y, y.new_empty(y.shape[0], 0)  # no final state

    return scan_by_length(stateless, cu_seqlens, {"x": (x, 0.0)}, None)[0]


def token_sequences(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the packed sequence each token belongs to (tokens past cu_seqlens[-1]: the last one)."""
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (torch.searchsorted(cu_seqlens, tokens, right=True) - 1).clamp_(0, cu_seqlens.numel() - 2)


def sequence_starts(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) in cu_seqlens' dtype: the position where each packed token's sequence starts."""
    return cu_seqlens[token_sequences(cu_seqlens, total)]
