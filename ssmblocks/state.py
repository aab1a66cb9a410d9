"""The state protocol: one small state type per kind of layer.

Every stateful layer has ``init_state(batch_size, max_seqlen=None, *, device=None, dtype=None)`` and a
``forward(x, state=...)`` that reads the state as it was before ``x[:, 0]`` and updates it in place
to after ``x[:, -1]``. Buffers are allocated once and written in place.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .errors import StateError


@dataclass
class ConvState:
    """State of a causal depthwise conv: the last ``k - 1`` inputs.

    conv: (b, channels, k - 1), in the activation dtype.
    """

    conv: torch.Tensor


@dataclass
class SSMState:
    """State of a selective-SSM mixer.

    conv: (b, conv_channels, k - 1), activation dtype.
    ssm:  (b, e, n) for SelectiveSSM; (b, h, p, n) for SSD. float32 unless ``state_dtype`` says otherwise.
    """

    conv: torch.Tensor
    ssm: torch.Tensor


@dataclass
class KVCache:
    """Preallocated key/value cache of one attention layer, position-aware and padding-aware.

    k, v:   (b, kv_heads, capacity, head_dim); slots ``[0, length)`` are filled.
    valid:  (b, capacity) bool; False for empty slots and slots written by padded (masked) tokens.
    pos:    (b,) int64; number of real tokens each row has seen (its next RoPE position).
    cursor: (b,) int64; number of filled slots, the same in every row. Kept on the device so that a
            one-token step never reads it on the host (the step can be captured in a CUDA graph).
    """

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    pos: torch.Tensor
    cursor: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def length(self) -> int:
        """Number of filled slots (reads the cursor on the host)."""
        return int(self.cursor[0])

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more slots, growing the buffers (doubling) if needed."""
        need = self.length + n
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        grow = cap - self.capacity
        self.k = torch.nn.functional.pad(self.k, (0, 0, 0, grow))
        self.v = torch.nn.functional.pad(self.v, (0, 0, 0, grow))
        self.valid = torch.nn.functional.pad(self.valid, (0, grow))


def check_state(state, kind: type, x: torch.Tensor, layer: str, layout: dict) -> None:
    """Raise a StateError naming what does not fit: type, batch size, dtype, device or layer shape.

    layout: {field: (dims after batch, None = any size; required dtype or None)} as the layer made it.
    """
    if not isinstance(state, kind):
        raise StateError(f"{layer}: expected a {kind.__name__} state, got {type(state).__name__}")
    batch = x.shape[0]
    for f in fields(state):
        t = getattr(state, f.name)
        if not isinstance(t, torch.Tensor):
            continue
        if t.shape[0] != batch:
            raise StateError(
                f"{layer}: state.{f.name} was made for batch size {t.shape[0]}, but the input has batch size "
                f"{batch}; call init_state({batch}) or select rows of the state"
            )
        if t.device != x.device:
            raise StateError(f"{layer}: state.{f.name} is on {t.device}, the input on {x.device}")
    for name, (dims, dtype) in layout.items():
        t = getattr(state, name)
        if t.dim() != len(dims) + 1 or any(d is not None and d != s for d, s in zip(dims, t.shape[1:], strict=False)):
            expected = ", ".join("any" if d is None else str(d) for d in dims)
            raise StateError(
                f"{layer}: state.{name} has shape {tuple(t.shape)}, expected (batch, {expected}); "
                "the state was made for a layer of another shape"
            )
        if dtype is not None and t.dtype != dtype:
            raise StateError(f"{layer}: state.{name} has dtype {t.dtype}, but the layer keeps it in {dtype}")
    activation = state.k if isinstance(state, KVCache) else state.conv
    if activation.dtype != x.dtype:
        raise StateError(
            f"{layer}: state was made for dtype {activation.dtype}, but the input is {x.dtype}; "
            f"call init_state(..., dtype={x.dtype})"
        )


# Fields that hold activations (they follow a dtype change); the others keep their dtype.
_ACTIVATION_FIELDS = {"conv", "k", "v"}


def map_state(state, fn):
    """Apply ``fn(field_name, tensor) -> tensor`` to every tensor of a layer state (tuples recurse)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(map_state(s, fn) for s in state)
    values = {f.name: getattr(state, f.name) for f in fields(state)}
    return type(state)(**{k: fn(k, v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


@dataclass
class ModelState:
    """The states of all layers of a model, in order (None for stateless layers; a tuple for a block of
    parallel mixers)."""

    layers: list

    def clone(self) -> ModelState:
        """An independent copy, to continue one prefix in several ways."""
        return ModelState([map_state(s, lambda _, t: t.clone()) for s in self.layers])

    def select(self, indices: torch.Tensor | list[int]) -> ModelState:
        """A state of the batch rows ``indices`` (integers, negative ones counting from the end, as in Python)
        in that order: reorder beams, drop finished rows."""
        index = torch.as_tensor(indices)
        if index.dim() != 1 or not (index.dtype == torch.long or index.dtype == torch.int32 or index.numel() == 0):
            raise StateError(
                f"select: indices must be a 1-d list or tensor of integer row indices, got {index.dtype} of shape "
                f"{tuple(index.shape)}"
            )

        def pick(_, t):
            rows = index.to(device=t.device, dtype=torch.long)
            if rows.numel() and (rows.min() < -t.shape[0] or rows.max() >= t.shape[0]):
                bad = rows[(rows < -t.shape[0]) | (rows >= t.shape[0])][0].item()
                raise StateError(f"select: row index out of range for batch size {t.shape[0]}: {bad}")
            return t.index_select(0, rows % t.shape[0])

        return ModelState([map_state(s, pick) for s in self.layers])

    def to(self, device=None, dtype=None) -> ModelState:
        """Move to ``device``; cast the activation buffers (conv, k, v) to ``dtype``. The SSM state keeps
        its own dtype (float32 unless the layer's state_dtype says otherwise)."""

        def move(name, t):
            cast = dtype if name in _ACTIVATION_FIELDS and dtype is not None else t.dtype
            return t.to(device=device if device is not None else t.device, dtype=cast)

        return ModelState([map_state(s, move) for s in self.layers])

    @property
    def batch_size(self) -> int:
        for s in self.layers:
            while isinstance(s, tuple):
                s = s[0] if s else None
            if s is not None:
                return getattr(s, fields(s)[0].name).shape[0]
        raise StateError("ModelState has no layer with a state")
