"""The ``cpp`` backend: the C++ CPU kernels, built on first use, and each op's C++ implementation with the
condition under which it may run.

The kernels (torch.ops.ssmblocks_cpu.*; sources in ``cpp/``: one ``.cpp`` per kernel family, ``bindings.cpp``
the op registrations, ``kernels.h`` and ``vectors.h`` the shared headers) are compiled into one library with
torch.utils.cpp_extension on first use. Building needs a C++ compiler and ninja (a dependency: the pip package)
and takes about a minute on two cores, once: the library lands in torch's extensions directory
(``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), later processes load it from there, and
it is rebuilt when the sources or the flags change (torch hashes the ``.cpp`` files and the flags; ninja
rebuilds the files whose headers changed).
When it cannot be built or loaded, every op keeps its torch implementation, after one warning per process. The
kernels use the widest vector unit the CPU has (AVX-512, AVX2, else the baseline); ``SSMBLOCKS_CPU_VECTORS=avx2``
or ``=baseline`` caps it for a process.

None of the kernels has a backward, so each may run only where no gradient is needed: on the CPU, on plain
tensors (no tensor subclass: quantized or distributed weights), outside autograd and torch.compile tracing.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..ops.selective_scan import step_size

_SOURCES = Path(__file__).with_name("cpp")
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a parameter of a tensor subclass has the subclass's type
_FLOATS = (torch.float32, torch.float64)
_BUILDING = "ssmblocks: building the C++ CPU kernels (first use or changed sources, about 1-2 min)..."
SMALL_BATCH_ROWS = range(2, 17)  # rows (batch x tokens) for which small_batch_linear beats MKL's sgemm


@functools.cache
def library():
    """``torch.ops.ssmblocks_cpu`` once the kernels are built and loaded; None if they cannot be."""
    # ATen's parallel_for is a header template that runs threads only when compiled with the OpenMP it uses.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # pip's ninja sits next to python, off PATH in a non-activated venv
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        sources = sorted(str(p) for p in _SOURCES.glob("*.cpp"))
        if not sources:
            raise FileNotFoundError(f"no C++ sources in {_SOURCES}")
        # Loading a built library takes well under a second; a load still running after 3 s is building.
        notice = threading.Timer(3.0, print, [_BUILDING], {"file": sys.stderr, "flush": True})
        notice.start()
        try:
            load(
                name="ssmblocks_cpu",
                sources=sources,
                extra_include_paths=[str(_SOURCES)],
                extra_cflags=["-O3", "-Wno-psabi", *openmp],
                extra_ldflags=openmp,
                is_python_module=False,
            )
        finally:
            notice.cancel()
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch paths still work
        warnings.warn(
            f"ssmblocks: the C++ CPU kernels could not be built ({type(exc).__name__}: {exc}); "
            "using the slower torch paths",
            stacklevel=2,
        )
        return None
    return torch.ops.ssmblocks_cpu


def may_run(*tensors: torch.Tensor | None) -> bool:
    """Whether a C++ kernel may take these tensors (None skipped): plain CPU tensors, no gradient needed
    through any, not being traced by torch.compile, and the kernels built."""
    present = [t for t in tensors if t is not None]
    return (
        all(type(t) in _PLAIN and t.device.type == "cpu" for t in present)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
        and not torch.compiler.is_compiling()
        and library() is not None
    )


def may_run_one_float(*tensors: torch.Tensor | None) -> bool:
    """``may_run``, and the tensors (None skipped) all float32 or all float64: the kernels that compute in
    their inputs' dtype."""
    dtype = tensors[0].dtype
    return dtype in _FLOATS and all(t is None or t.dtype == dtype for t in tensors) and may_run(*tensors)


def _work(x: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors in the scans' working dtype: float64 for float64 x, else float32."""
    wd = torch.float64 if x.dtype == torch.float64 else torch.float32
    return [None if t is None else t.to(wd) for t in (x, *tensors)]


# Each op's C++ implementation (same arguments as its torch implementation in ssmblocks/ops) and condition.


def selective_scan(
    x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None, *, dt_softplus=False, cu_seqlens=None
):
    """One pass over time: chunk_size, the chunked algorithm's, has no meaning here."""
    xw, dt, A, B, C, D, z, h0 = _work(x, dt, A, B, C, D, z, initial_state)
    y, h = library().selective_scan(xw, step_size(dt, dt_softplus, xw.dtype), A, B, C, D, z, h0)
    return y.to(x.dtype), h


def selective_scan_may_run(
    x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None, *, dt_softplus=False, cu_seqlens=None
):
    return cu_seqlens is None and may_run(x, dt, A, B, C, D, z, initial_state)


def selective_scan_step(x, dt, A, B, C, state, D=None, z=None, *, dt_softplus=False):
    xw, dt, A, B, C, D, z = _work(x, dt, A, B, C, D, z)
    return library().selective_scan_step(xw, step_size(dt, dt_softplus, xw.dtype), A, B, C, state, D, z).to(x.dtype)


def selective_scan_step_may_run(x, dt, A, B, C, state, D=None, z=None, state_indices=None, *, dt_softplus=False):
    """Also: a contiguous state in the working dtype, one a row (no pool of slots: ``state_indices``)."""
    wd = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (
        state_indices is None and state.dtype == wd and state.is_contiguous() and may_run(x, dt, A, B, C, state, D, z)
    )


def ssd_scan(x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None, cu_seqlens=None):
    """One pass over time, each head's state block in the caches: chunk_size has no meaning here."""
    y, state = library().ssd_scan(*_work(x, dt, A, B, C, D, initial_state))
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(x.dtype), state


def ssd_scan_may_run(x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=None, cu_seqlens=None):
    return cu_seqlens is None and may_run(x, dt, A, B, C, D, z, initial_state)


def causal_conv1d(x, weight, bias=None, activation=None, conv_state=None, mask=None, cu_seqlens=None):
    return library().causal_conv1d(x, weight[:, 0], bias, conv_state, activation == "silu")


def causal_conv1d_may_run(x, weight, bias=None, activation=None, conv_state=None, mask=None, cu_seqlens=None):
    return (
        mask is None
        and cu_seqlens is None
        and weight.shape[-1] <= 4
        and (conv_state is None or conv_state.is_contiguous())
        and may_run_one_float(x, weight, bias, conv_state)
    )


def causal_conv1d_step(x, conv_state, weight, bias=None, activation=None):
    return library().causal_conv1d_step(x, conv_state, weight[:, 0], bias, activation == "silu")


def causal_conv1d_step_may_run(x, conv_state, weight, bias=None, activation=None, state_indices=None):
    """Also: a contiguous conv_state, one a row (no pool of slots: ``state_indices``)."""
    return state_indices is None and conv_state.is_contiguous() and may_run_one_float(x, conv_state, weight, bias)


def rms_norm(x, weight, eps, group_size=None):
    d = x.shape[-1]
    return library().rms_norm(x.reshape(-1, d), None, weight, eps, group_size or d, False).view(x.shape)


def rms_norm_may_run(x, weight, eps, group_size=None):
    return may_run_one_float(x, weight)


def gated_rms_norm(x, z, weight, eps, group_size=None, norm_before_gate=False):
    d = x.shape[-1]
    y = library().rms_norm(x.reshape(-1, d), z.reshape(-1, d), weight, eps, group_size or d, norm_before_gate)
    return y.view(x.shape)


def gated_rms_norm_may_run(x, z, weight, eps, group_size=None, norm_before_gate=False):
    return may_run_one_float(x, z, weight)


def linear(x, weight, bias=None):
    """Decode's few rows: MKL's sgemm takes 2-3x as long for 8 rows as for one row of the same weights, where
    ``small_batch_linear`` streams the weights once."""
    k = x.shape[-1]
    return library().small_batch_linear(x.reshape(-1, k), weight, bias).view(*x.shape[:-1], weight.shape[0])


def linear_may_run(x, weight, bias=None):
    k = x.shape[-1]
    return (x.numel() // k if k else 0) in SMALL_BATCH_ROWS and may_run_one_float(x, weight, bias)
