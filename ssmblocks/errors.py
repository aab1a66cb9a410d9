"""Typed errors raised at the library's boundaries (layer entry, state checks, packing, files), and the
checks that raise them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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


class NonFiniteWarning(UserWarning):
    """Weights loaded or saved hold NaN or infinity (``from_pretrained(..., non_finite="error")`` refuses)."""


def read_regular(path: Path, limit: int, error: type[Exception]) -> bytes:
    """The bytes of the regular file ``path`` (symlinks followed), at most ``limit`` of them, else ``error``
    naming the file. Opened without blocking and checked once open, so a FIFO, device or socket is refused
    rather than waited on or read without end."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path}: not a regular file (a FIFO, device, socket or folder); refused")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{path}: larger than {limit:,} bytes; refused")
    return data
