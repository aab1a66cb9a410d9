"""Whether bfloat16 is worth using on this CPU."""

from __future__ import annotations

import functools
import time
import warnings

import torch


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Time one small bfloat16 matmul against float32 (a few ms, once per process).

    CPUs without bf16 instructions (many AVX2 machines) run bf16 matmuls tens of times slower than fp32,
    and the CPU flags alone do not say so reliably, so this measures instead: the fastest of 5 calls after
    3 warm-up calls (the first bf16 calls set up oneDNN's kernels, 20-50x slower than the later ones on an
    AMX machine).
    """
    a, b = torch.randn(128, 512), torch.randn(512, 512)

    def seconds(dtype: torch.dtype) -> float:
        x, w = a.to(dtype), b.to(dtype)
        for _ in range(3):
            x @ w
        times = []
        for _ in range(5):
            start = time.perf_counter()
            x @ w
            times.append(time.perf_counter() - start)
        return min(times)

    return seconds(torch.bfloat16) <= 2 * seconds(torch.float32)


def warn_if_slow_bf16(dtype: torch.dtype | None, device) -> None:
    """Warn when a model is asked for in bfloat16 on a CPU where bf16 is slow."""
    if dtype == torch.bfloat16 and torch.device(device or "cpu").type == "cpu" and not cpu_bf16_is_fast():
        warnings.warn(
            "bfloat16 matmuls are much slower than float32 on this CPU (no native bf16 instructions); "
            "use dtype=torch.float32 for speed",
            stacklevel=3,
        )
