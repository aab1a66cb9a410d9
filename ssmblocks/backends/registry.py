"""Every op's implementations, and the one rule that picks among them at each call.

| op                   | torch (ssmblocks/ops, autograd)        | cpp (cpp_kernels.py: CPU, no autograd)   |
|----------------------|----------------------------------------|------------------------------------------|
| selective_scan       | selective_scan_torch (chunked)         | selective_scan (one pass over time)      |
| selective_scan_step  | selective_scan_step_torch              | selective_scan_step (state contiguous,   |
|                      |                                        |   in the working dtype; no pool)         |
| ssd_scan             | ssd_scan_torch (chunked)               | ssd_scan (one pass over time)            |
| ssd_step             | ssd_step_torch                         | -                                        |
| causal_conv1d        | causal_conv1d_torch                    | causal_conv1d (width <= 4, no mask)      |
| causal_conv1d_step   | causal_conv1d_step_torch               | causal_conv1d_step (no pool)             |
| rms_norm             | rms_norm_torch                         | rms_norm                                 |
| gated_rms_norm       | gated_rms_norm_torch                   | gated_rms_norm                           |
| add_rms_norm         | add_rms_norm_torch                     | -                                        |
| linear               | torch.nn.functional.linear             | linear (2..16 rows)                      |

The three steps take ``state_indices`` for a pool of states (every torch and triton step; "no pool": that cpp
step declines such a call). Every cpp implementation also needs plain CPU tensors, no gradient through them, no
torch.compile tracing and the kernels built; the float32/float64-only ones say so in their condition (cpp_kernels.py).
Packed sequences (``cu_seqlens``) run as they lie in the triton scans and causal_conv1d and in
causal_conv1d_torch; the torch scans run them in right-padded groups of similar length; the cpp ones decline them.

| op                   | triton (triton_kernels.py: CUDA, autograd, custom ops; kernels in ``kernels/``)     |
|----------------------|--------------------------------------------------------------------------------------|
| selective_scan       | selective_scan (chunked; float32/bf16/fp16 inputs; chunk_size None or 8, 16, 32, 64) |
| selective_scan_step  | selective_scan_step (no autograd; state contiguous, float32/bf16/fp16)               |
| ssd_scan             | ssd_scan (chunked; float32/bf16/fp16 inputs; chunk_size None or 16, 32, 64, 128; packed) |
| ssd_step             | ssd_step (state contiguous; no autograd: decode)                                     |
| causal_conv1d        | causal_conv1d (width 2..4; mask, conv_state, packed; no gradient for conv_state)     |
| causal_conv1d_step   | causal_conv1d_step (width 2..4; state unit last stride; no autograd: decode)         |
| rms_norm             | rms_norm (group_size <= 8192)                                                        |
| gated_rms_norm       | gated_rms_norm (group_size <= 8192; norm_before_gate both ways)                      |
| add_rms_norm         | add_rms_norm (d <= 8192; summed and y in one pass)                                   |

Every triton implementation takes float32, bfloat16 or float16 inputs; linear has none: under the selection
"triton" it runs its torch one.

The rule. The selected backend (``use(name)``, else ``$SSMBLOCKS_BACKEND``, else "auto") names the candidates,
tried in order; the first whose condition holds for the call's arguments runs:

- "auto": triton, cpp, then torch (each accelerated backend's condition names its device);
- "cpp" or "triton": that backend, then torch;
- "torch": torch alone.

torch always may run: it is the implementation with autograd and every other one's fallback. Whole decode steps
(several ops in one C++ call, or a CUDA graph) are bound by ``plans.decode_plan`` under the same selection.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch.nn.functional as F

from ..ops.conv import causal_conv1d_step_torch, causal_conv1d_torch
from ..ops.norm import add_rms_norm_torch, gated_rms_norm_torch, rms_norm_torch
from ..ops.selective_scan import selective_scan_step_torch, selective_scan_torch
from ..ops.ssd import ssd_scan_torch, ssd_step_torch
from . import cpp_kernels as cpp
from . import triton_kernels as triton

BACKENDS = ("torch", "cpp", "triton")
SELECTIONS = ("auto", *BACKENDS)
_CANDIDATES = {"auto": ("triton", "cpp"), "torch": (), "cpp": ("cpp",), "triton": ("triton",)}


def _checked(name: str, where: str) -> str:
    if name not in SELECTIONS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(SELECTIONS)}")
    return name


_selected = _checked(os.environ.get("SSMBLOCKS_BACKEND") or "auto", "SSMBLOCKS_BACKEND")
_records: list[tuple[str, str]] | None = None


def selected() -> str:
    """The backend selection in force: "auto", "torch", "cpp" or "triton"."""
    return _selected


@contextmanager
def use(name: str) -> Iterator[None]:
    """Run the ops inside the block under backend selection ``name`` ("auto", "torch", "cpp", "triton")."""
    global _selected
    previous, _selected = _selected, _checked(name, "ssmblocks.backends.use")
    try:
        yield
    finally:
        _selected = previous


@contextmanager
def record() -> Iterator[list[tuple[str, str]]]:
    """Collect ``(op name, backend)`` for every op call inside the block, in order (also the decode plans'
    one-call steps: "selective_ssm_step", "ssd_mixer_step", "norm_linear")."""
    global _records
    previous, _records = _records, []
    try:
        yield _records
    finally:
        _records = previous


def note(op: str, backend: str) -> None:
    """Add ``(op, backend)`` to the records of an enclosing ``record()`` block, if any."""
    if _records is not None:
        _records.append((op, backend))


def _always(*args, **kwargs) -> bool:
    return True


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op: ``fn`` and ``may_run``, which take the op's arguments."""

    backend: str
    fn: Callable
    may_run: Callable[..., bool] = _always


class Op:
    """An op with its torch implementation and the ones that may replace it; calling the op runs the one that
    ``choose`` picks for the arguments. Its docstring is the torch implementation's (the specification)."""

    def __init__(self, name: str, torch_fn: Callable, *others: Implementation):
        self.name = name
        self.implementations = {"torch": Implementation("torch", torch_fn), **{i.backend: i for i in others}}
        self.__doc__ = torch_fn.__doc__

    def choose(self, *args, **kwargs) -> Implementation:
        """The implementation a call with these arguments takes under the current selection."""
        for backend in _CANDIDATES[_selected]:
            impl = self.implementations.get(backend)
            if impl is not None and impl.may_run(*args, **kwargs):
                return impl
        return self.implementations["torch"]

    def which(self, *args, **kwargs) -> str:
        """The backend ("torch", "cpp" or "triton") a call with these arguments takes."""
        return self.choose(*args, **kwargs).backend

    def __call__(self, *args, **kwargs):
        impl = self.choose(*args, **kwargs)
        note(self.name, impl.backend)
        return impl.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={list(self.implementations)})"


selective_scan = Op(
    "selective_scan",
    selective_scan_torch,
    Implementation("cpp", cpp.selective_scan, cpp.selective_scan_may_run),
    Implementation("triton", triton.selective_scan, triton.selective_scan_may_run),
)
selective_scan_step = Op(
    "selective_scan_step",
    selective_scan_step_torch,
    Implementation("cpp", cpp.selective_scan_step, cpp.selective_scan_step_may_run),
    Implementation("triton", triton.selective_scan_step, triton.selective_scan_step_may_run),
)
ssd_scan = Op(
    "ssd_scan",
    ssd_scan_torch,
    Implementation("cpp", cpp.ssd_scan, cpp.ssd_scan_may_run),
    Implementation("triton", triton.ssd_scan, triton.ssd_scan_may_run),
)
ssd_step = Op("ssd_step", ssd_step_torch, Implementation("triton", triton.ssd_step, triton.ssd_step_may_run))
causal_conv1d = Op(
    "causal_conv1d",
    causal_conv1d_torch,
    Implementation("cpp", cpp.causal_conv1d, cpp.causal_conv1d_may_run),
    Implementation("triton", triton.causal_conv1d, triton.causal_conv1d_may_run),
)
causal_conv1d_step = Op(
    "causal_conv1d_step",
    causal_conv1d_step_torch,
    Implementation("cpp", cpp.causal_conv1d_step, cpp.causal_conv1d_step_may_run),
    Implementation("triton", triton.causal_conv1d_step, triton.causal_conv1d_step_may_run),
)
rms_norm = Op(
    "rms_norm",
    rms_norm_torch,
    Implementation("cpp", cpp.rms_norm, cpp.rms_norm_may_run),
    Implementation("triton", triton.rms_norm, triton.rms_norm_may_run),
)
gated_rms_norm = Op(
    "gated_rms_norm",
    gated_rms_norm_torch,
    Implementation("cpp", cpp.gated_rms_norm, cpp.gated_rms_norm_may_run),
    Implementation("triton", triton.gated_rms_norm, triton.gated_rms_norm_may_run),
)
add_rms_norm = Op(
    "add_rms_norm", add_rms_norm_torch, Implementation("triton", triton.add_rms_norm, triton.add_rms_norm_may_run)
)
linear = Op("linear", F.linear, Implementation("cpp", cpp.linear, cpp.linear_may_run))

OPS = {
    op.name: op
    for op in (
        selective_scan,
        selective_scan_step,
        ssd_scan,
        ssd_step,
        causal_conv1d,
        causal_conv1d_step,
        rms_norm,
        gated_rms_norm,
        add_rms_norm,
        linear,
    )
}


def available() -> list[str]:
    """The backends that can run on this machine: torch; cpp where its kernels build; triton where Triton imports
    and a CUDA device is present, or Triton's interpreter is on (``TRITON_INTERPRET=1``)."""
    import torch

    found = ["torch"]
    if cpp.library() is not None:
        found.append("cpp")
    if (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1") and triton.importable():
        found.append("triton")
    return found
