"""A pool of states: the decode steps' ``state_indices`` address slots of a (s, ...) state instead of rows.

The slots are not checked against the pool's size (that would wait on the GPU and break graph capture): they
must lie in [0, s) and be distinct (two rows writing one slot race).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def state_rows(state_indices: torch.Tensor | None, batch: int, state: torch.Tensor) -> int:
    """The leading size ``state`` must have: ``batch``, or with ``state_indices`` the pool's own size. Raises
    ValueError unless state_indices is None or an int32/int64 (batch,) tensor on the state's device."""
    if state_indices is None:
        return batch
    if state_indices.shape != (batch,) or state_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"state_indices must be int32 or int64 of shape (b,) = ({batch},), got {state_indices.dtype} "
            f"{tuple(state_indices.shape)}"
        )
    if state_indices.device != state.device:
        raise ValueError(f"state_indices is on {state_indices.device}, the state on {state.device}")
    return state.shape[0]


def on_slots(
    pool: torch.Tensor, state_indices: torch.Tensor, batch: int, step: Callable[[torch.Tensor], torch.Tensor]
):
    """Run ``step(rows)`` on a gathered copy of pool[state_indices] (``batch`` distinct slots), which the step
    updates in place, then write the rows back to their slots; the other slots are untouched. Returns what step
    returns."""
    state_rows(state_indices, batch, pool)
    state_indices = state_indices.long()
    rows = pool[state_indices]
    out = step(rows)
    pool.index_copy_(0, state_indices, rows)
    return out
