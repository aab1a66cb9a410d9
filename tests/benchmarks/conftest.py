"""Collects the benchmark figures and prints ours, transformers', the floor and their ratios at the end.

Every side runs with malloc reusing freed memory (ssmblocks.allocator), unless SSMBLOCKS_DEFAULT_MALLOC=1.
"""

import os

import pytest

from ssmblocks.allocator import reuse_freed_memory

RESULTS: dict[tuple[str, str], dict[str, float]] = {}


def record(model: str, case: str, side: str, value: float) -> None:
    RESULTS.setdefault((model, case), {})[side] = value


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write(
        f"{'model':<13}{'case':<28}{'ours':>10}{'transformers':>14}{'floor':>10}{'ours/floor':>12}{'theirs/ours':>13}"
    )
    for (model, case), sides in sorted(RESULTS.items()):
        ours, theirs, floor = (sides.get(k) for k in ("ours", "theirs", "floor"))
        cells = [f"{v:>10.3g}" if v is not None else f"{'-':>10}" for v in (ours,)]
        cells.append(f"{theirs:>14.3g}" if theirs is not None else f"{'-':>14}")
        cells.append(f"{floor:>10.3g}" if floor is not None else f"{'-':>10}")
        ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"  # noqa: E731
        unit = "tok/s" if "decode" in case else ("MiB" if "memory" in case else "s")
        higher_better = unit == "tok/s"
        of = ratio(floor, ours) if higher_better else ratio(ours, floor)
        to = ratio(ours, theirs) if higher_better else ratio(theirs, ours)
        write(f"{model:<13}{case + ' [' + unit + ']':<28}{''.join(cells)}{of:>12}{to:>13}")


@pytest.fixture
def results():
    return record


@pytest.fixture(scope="session", autouse=True)
def allocator():
    """The same allocator setting for ours, transformers and the floor (they run in this one process)."""
    reused = os.environ.get("SSMBLOCKS_DEFAULT_MALLOC") != "1" and reuse_freed_memory()
    print(f"\nmalloc reuses freed memory: {reused}")
