"""What the GPU benchmark scripts share: a printed log kept for a file, max-relative error, NaN-poisoned
free memory and the peak memory a call adds."""

from pathlib import Path

import torch

DEVICE = "cuda"
LOG: list[str] = []


def say(*parts) -> None:
    """Print a line and keep it for ``write_log``."""
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.append(line)


def write_log(path: Path) -> None:
    """Every line said so far, to ``path`` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(LOG) + "\n")


def rel_err(a: torch.Tensor, r: torch.Tensor) -> float:
    """max |a - r| / max |r| in float32."""
    a, r = a.detach().float(), r.detach().float()
    return ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


def poison() -> None:
    """Leave NaN in the caching allocator's free blocks, so that an output the kernels skip shows up."""
    block = torch.full((1 << 28,), float("nan"), device=DEVICE)
    del block


def peak_extra(fn) -> int:
    """Bytes the call adds to the allocated memory at its peak."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
