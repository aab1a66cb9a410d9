"""The decode steps (SSD, selective scan, causal conv) on a pool of states (``state_indices``): every backend
that takes the call updates exactly the addressed slots as the batch step would, and leaves the others bit
for bit."""

import pytest
import torch

from ssmblocks import backends, ops
from ssmblocks.ops.conv import causal_conv1d_step_torch
from ssmblocks.ops.selective_scan import selective_scan_step_torch
from ssmblocks.ops.ssd import ssd_step_torch
from tests.helpers import assert_close

pytest.importorskip("triton")
from ssmblocks.kernels.ssd_step import ssd_step_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POOL, SLOTS = 7, [5, 0, 3]


def step_args(name):
    """(args before the state, the pool, args after it) for op ``name``, batch 3, odd sizes."""
    torch.manual_seed(0)
    g = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    b = len(SLOTS)
    if name == "causal_conv1d_step":
        c, k = 10, 4
        return (g(b, c),), g(POOL, c, k - 1), (g(c, 1, k), g(c), "silu")
    if name == "ssd_step":
        h, p, gr, n = 4, 5, 2, 6
        before = (g(b, h, p), g(b, h).abs(), -g(h).abs(), g(b, gr, n), g(b, gr, n))
        return before, g(POOL, h, p, n), (g(h, p), g(b, h, p))
    e, n = 10, 6
    return (g(b, e), g(b, e).abs(), -g(e, n).abs(), g(b, n), g(b, n)), g(POOL, e, n), (g(e), g(b, e))


REFERENCES = {
    "ssd_step": ssd_step_torch,
    "selective_scan_step": selective_scan_step_torch,
    "causal_conv1d_step": causal_conv1d_step_torch,
}


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("selection", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_a_pooled_step_updates_only_its_slots(name, selection, index_dtype):
    before, pool, after = step_args(name)
    slots = torch.tensor(SLOTS, device=DEVICE, dtype=index_dtype)
    rows = pool[SLOTS].clone()
    y_ref = REFERENCES[name](*before, rows, *after)  # the batch step on the addressed states
    expected = pool.clone()
    expected[SLOTS] = rows
    with backends.use(selection), backends.record() as calls:
        y = getattr(ops, name)(*before, pool, *after, state_indices=slots)
    assert calls == [(name, "triton" if selection == "triton" else "torch")]  # C++ declines a pool
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(pool[SLOTS], expected[SLOTS], 1e-5, "the addressed slots")
    untouched = [i for i in range(POOL) if i not in SLOTS]
    assert torch.equal(pool[untouched], expected[untouched])


def test_bad_state_indices_are_named():
    before, pool, after = step_args("ssd_step")
    with pytest.raises(ValueError, match="state_indices must be int32 or int64 of shape"):
        ssd_step_triton(*before, pool, *after, state_indices=torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="state_indices must be int32 or int64"):
        ssd_step_triton(*before, pool, *after, state_indices=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"state must be contiguous \(b, h, p, n\) = \(7"):
        ssd_step_triton(*before, pool[:, :2], *after, state_indices=torch.tensor(SLOTS, device=DEVICE))
    with backends.use("torch"), pytest.raises(ValueError, match="state_indices must be int32 or int64 of shape"):
        ops.ssd_step(*before, pool, *after, state_indices=torch.tensor([0, 1], device=DEVICE))


def test_the_pooled_ssd_step_passes_opcheck():
    from ssmblocks.kernels.ssd_step import ssd_step_op

    (x, dt, A, B, C), pool, (D, z) = step_args("ssd_step")
    torch.library.opcheck(ssd_step_op, (x, dt, A, B, C, pool, D, z, torch.tensor(SLOTS, device=DEVICE)))
