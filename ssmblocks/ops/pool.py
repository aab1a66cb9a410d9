"""A pool of states: the decode steps' ``state_indices`` address slots of a (s, ...) state instead of rows."""

from __future__ import annotations

from collections.abc import Callable

import torch


def on_slots(pool: torch.Tensor, state_indices: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor]):
    """Run ``step(rows)`` on a gathered copy of pool[state_indices] (distinct slots), which the step updates in
    place, then write the rows back to their slots; the other slots are untouched. Returns what step returns."""
    state_indices = state_indices.long()
    rows = pool[state_indices]
    out = step(rows)
    pool.index_copy_(0, state_indices, rows)
    return out
