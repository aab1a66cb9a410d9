"""The checks every sequence layer makes at its entry, in one place."""

from __future__ import annotations

import torch

from ..errors import ShapeError, StateError, check_hidden
from ..ops.packing import check_attention_mask, check_cu_seqlens
from ..state import check_state


def check_inputs(
    layer: torch.nn.Module,
    x: torch.Tensor,
    d_model: int,
    state,
    state_type: type,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> torch.Tensor | None:
    """Validate a layer call; return the padding mask as bool (b, l), or None.

    Packed input (cu_seqlens) starts every sequence from a fresh state, so it takes no state and no mask.
    """
    name = type(layer).__name__
    check_hidden(x, d_model, name)
    if cu_seqlens is not None:
        if state is not None:
            raise StateError(f"{name}: cu_seqlens (packed sequences) cannot be combined with a state")
        if attention_mask is not None:
            raise ShapeError(f"{name}: pass either cu_seqlens (packed) or attention_mask (padded), not both")
        check_cu_seqlens(cu_seqlens, x, name)
        return None
    if state is not None:
        check_state(state, state_type, x, name, layer.state_layout())
    return None if attention_mask is None else check_attention_mask(attention_mask, x, name)
