"""Typed errors raised at the library's boundaries (layer entry, state checks, packing)."""

from __future__ import annotations

import torch


class SSMBlocksError(Exception):
    """Base class of every error ssmblocks raises on purpose."""


class ShapeError(SSMBlocksError, ValueError):
    """An input tensor has the wrong rank, size or layout."""


class StateError(SSMBlocksError, ValueError):
    """An inference state does not fit the layer or the input it is used with."""


def check_hidden(x, d_model: int, layer: str) -> None:
    """Check a layer input `x: (b, l, d)`; name the layer and what is wrong."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 3:
        raise ShapeError(
            f"{layer}: expected input of shape (batch, seqlen, {d_model}), got rank {x.dim()} shape {tuple(x.shape)}"
        )
    if x.shape[-1] != d_model:
        raise ShapeError(
            f"{layer}: input has last dimension {x.shape[-1]}, but the layer was built with d_model={d_model}"
        )
    if x.shape[1] == 0:
        raise ShapeError(f"{layer}: empty sequence (seqlen 0); pass at least one token")
    if x.shape[0] == 0:
        raise ShapeError(f"{layer}: empty batch (batch size 0)")
    if not x.is_floating_point():
        raise TypeError(
            f"{layer}: expected floating-point hidden states, got {x.dtype}; token ids go through an embedding first"
        )


def check_positive(layer: str, **sizes: int) -> None:
    """Raise a ValueError naming the first size that is not a positive integer."""
    for field, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{layer}: {field} must be a positive integer, got {value!r}")


class CheckpointError(SSMBlocksError, ValueError):
    """A checkpoint cannot be loaded or saved as asked; the message names the file, key or field."""
