"""CausalConv1d: depthwise causal convolution over time, channels-last."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import check_positive
from ..ops import causal_conv1d, causal_conv1d_step
from ..state import ConvState
from ._entry import SequenceLayer
from ._local import local


class CausalConv1d(SequenceLayer):
    """y[t] = act(bias + sum_j weight[:, 0, j] * x[t - k + 1 + j]); x, y: (b, l, channels).

    Parameters ``weight (channels, 1, k)`` and ``bias (channels,)`` have the shapes of a depthwise
    ``nn.Conv1d``, so checkpoints map one to one. activation: None or "silu". Padded positions
    (attention_mask 0) are skipped.

    Args:
        channels: channels of x (one filter each).
        kernel_size: width k of each filter.
        bias: whether there is a bias.
        activation: None or "silu", applied to the output.
        device, dtype: of the parameters.
    """

    state_type = ConvState
    packed_natively = True

    def __init__(
        self,
        channels: int,
        kernel_size: int = 4,
        bias: bool = True,
        activation: str | None = None,
        device=None,
        dtype=None,
    ):
        """Build the layer; the arguments are described in the class docstring."""
        super().__init__()
        check_positive("CausalConv1d", channels=channels, kernel_size=kernel_size)
        if activation not in (None, "silu"):
            raise ValueError(f"CausalConv1d: activation must be None or 'silu', got {activation!r}")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As nn.Conv1d: uniform in +-1/sqrt(fan_in), fan_in = kernel_size for a depthwise conv."""
        bound = 1 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def init_state(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None) -> ConvState:
        """Zero state (the input before the first token is zero). max_seqlen is unused: the state is O(1)."""
        device = self.weight.device if device is None else device
        dtype = self.weight.dtype if dtype is None else dtype
        return ConvState(torch.zeros(batch_size, self.channels, self.kernel_size - 1, device=device, dtype=dtype))

    def state_layout(self) -> dict:
        """Shape (after batch) and dtype of each state field, for checking a state handed in."""
        return {"conv": ((self.channels, self.kernel_size - 1), None)}

    def conv(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The convolution alone (no checks): x (b, l, channels); conv_state (b, channels, k-1) or None;
        mask (b, l) bool left padding, whose padded inputs are skipped; cu_seqlens packed sequences (b = 1)."""
        weight, bias = local(self.weight), local(self.bias)
        if x.shape[1] == 1 and conv_state is not None and mask is None:  # decode's one token
            return causal_conv1d_step(x[:, 0], conv_state, weight, bias, self.activation)[:, None]
        return causal_conv1d(x, weight, bias, self.activation, conv_state, mask, cu_seqlens=cu_seqlens)

    @property
    def width(self) -> int:
        return self.channels

    def _mix(
        self,
        x: torch.Tensor,
        state: ConvState | None,
        mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.conv(x, None if state is None else state.conv, mask, cu_seqlens)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={bias}, activation={self.activation}"
