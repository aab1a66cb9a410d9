"""The C++ CPU kernels (``ssmblocks/backends/cpp/``: one ``.cpp`` per kernel family, ``bindings.cpp`` the op
registrations, ``kernels.h`` and ``vectors.h`` the shared headers), compiled on first use with
torch.utils.cpp_extension into one library.

Building needs a C++ compiler and ninja (a dependency: the pip package) and takes seconds, once: the library
lands in torch's extensions directory (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``),
later processes load it from there, and it is rebuilt when the sources or the flags change (torch hashes
the ``.cpp`` files and the flags; ninja, which each new process runs, rebuilds the files whose headers
changed). When it cannot be built or loaded, the callers keep their torch paths, after one warning per
process. The kernels use the widest vector unit the CPU has (AVX-512, AVX2, else the baseline);
``SSMBLOCKS_CPU_VECTORS=avx2`` or ``=baseline`` caps it for a process (the tests run every variant this way)."""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path

import torch

_SOURCES = Path(__file__).parent.parent / "backends" / "cpp"


@functools.cache
def cpu_ops():
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
        load(
            name="ssmblocks_cpu",
            sources=sources,
            extra_include_paths=[str(_SOURCES)],
            extra_cflags=["-O3", "-Wno-psabi", *openmp],
            extra_ldflags=openmp,
            is_python_module=False,
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch paths still work
        warnings.warn(
            f"ssmblocks: the C++ CPU kernels could not be built ({type(exc).__name__}: {exc}); "
            "using the slower torch paths",
            stacklevel=2,
        )
        return None
    return torch.ops.ssmblocks_cpu


def cpu_kernels_may_run(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on these tensors (None entries skipped) may take a C++ kernel: all on the CPU, no
    autograd through any of them (the kernels have no backward), and not being traced by torch.compile.
    The caller adds its own dtype and layout conditions, then asks ``cpu_ops()`` for the kernels."""
    present = [t for t in tensors if t is not None]
    return (
        all(t.device.type == "cpu" for t in present)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
        and not torch.compiler.is_compiling()
    )


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a parameter of a tensor subclass has the subclass's type


def cpu_kernels_take(*tensors: torch.Tensor | None) -> bool:
    """``cpu_kernels_may_run``, and the tensors (None skipped) plain float32 or float64 tensors of the first
    one's dtype: no tensor subclasses (quantized or distributed weights), which the kernels cannot read."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    return (
        dtype in (torch.float32, torch.float64)
        and all(type(t) in _PLAIN and t.dtype == dtype for t in present)
        and cpu_kernels_may_run(*present)
    )
