"""The pool-of-states addressing that the decode steps share: row i of a batch reads and writes state slot
``state_indices[i]`` of a pool (s, ...) instead of state[i].

The slots are not checked against the pool's size here (that would wait on the GPU and break graph capture):
they must lie in [0, s) and be distinct (two rows writing one slot race).
"""

import torch


def check_state_indices(state_indices: torch.Tensor | None, batch: int, state: torch.Tensor) -> None:
    """ValueError unless state_indices is None or an int32/int64 (batch,) tensor on the state's device."""
    if state_indices is None:
        return
    if state_indices.shape != (batch,) or state_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"state_indices must be int32 or int64 of shape (b,) = ({batch},), got {state_indices.dtype} "
            f"{tuple(state_indices.shape)}"
        )
    if state_indices.device != state.device:
        raise ValueError(f"state_indices is on {state_indices.device}, the state on {state.device}")
