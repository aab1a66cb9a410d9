"""The entry every sequence layer shares: checks, then the layer's computation (packed input natively where the
layer can, else as a right-padded batch)."""

from __future__ import annotations

import torch

from ..errors import ShapeError, StateError, check_hidden
from ..ops.packing import check_attention_mask, check_cu_seqlens, run_packed
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
    # the first weight (the input projection's, or the conv's) has the activation dtype; A_log, D, ... stay float32
    weight = next(p for n, p in layer.named_parameters() if n.endswith("weight")).dtype
    if x.dtype != weight and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name}: input dtype {x.dtype} differs from the layer's {weight}; cast one to the other "
            "(layer.to(dtype) or x.to(dtype)), or run under torch.autocast"
        )
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


class SequenceLayer(torch.nn.Module):
    """Base of the sequence layers: ``forward`` validates the call, then runs ``_mix(x, state, mask)``, the
    layer's own computation; packed sequences go to ``_mix(x, None, None, cu_seqlens)`` where the layer's ops
    take them as they lie (``packed_natively``), else through ``_mix`` as right-padded batches.

    Subclasses set ``state_type`` and ``width`` (the size of the last input dimension) and implement
    ``_mix`` and ``state_layout``. Their sizes (``n_heads``, ``d_inner``, ...) are the whole layer's; under
    tensor parallelism over ``tp_size`` ranks each rank computes its share (``local_heads``, ...).
    """

    state_type: type
    packed_natively = False  # True: _mix takes cu_seqlens as a fourth argument
    tp_size = 1  # the ranks tensor parallelism splits the layer over (ssmblocks.distributed sets it)

    def forward(
        self,
        x: torch.Tensor,
        state=None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (b, l, width) -> (b, l, width).

        state: the layer's state, read as it was before x[:, 0] and updated in place to after x[:, -1].
        attention_mask: (b, l) left padding, 1 = real token; padded positions change no state and reach no
        real output.
        cu_seqlens: (n + 1,) int boundaries of packed sequences in a batch-1 input; each starts fresh.
        """
        mask = check_inputs(self, x, self.width, state, self.state_type, attention_mask, cu_seqlens)
        if cu_seqlens is None:
            return self._mix(x, state, mask)
        if self.packed_natively:
            return self._mix(x, None, None, cu_seqlens)
        return run_packed(lambda padded: self._mix(padded, None, None), x, cu_seqlens)
