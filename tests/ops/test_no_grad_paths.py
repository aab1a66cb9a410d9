"""The in-place path selective_scan takes without autograd equals the reference and the autograd path."""

import pytest
import torch

from ssmblocks.ops import selective_scan, selective_scan_ref
from tests.helpers import assert_close


@pytest.fixture(autouse=True)
def torch_only(torch_path):
    """The torch implementation; the C++ one is tested in test_selective_scan_cpu_kernel.py."""


def _inputs(b=2, l=29, e=6, n=5, dt_scale=0.5):
    return (
        torch.randn(b, l, e),
        torch.rand(b, l, e) * dt_scale,
        -torch.rand(e, n) * 8,
        torch.randn(b, l, n),
        torch.randn(b, l, n),
        torch.randn(e),
        torch.randn(b, l, e),
        torch.randn(b, e, n),
    )


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("chunk_size", [1, 8, 13])
def test_in_place_path_matches_reference(mode, chunk_size):
    x, dt, A, B, C, D, z, h0 = _inputs()
    ref_y, ref_h = selective_scan_ref(x.double(), dt.double(), A.double(), B.double(), C.double(), D, z, h0.double())
    h0_before = h0.clone()
    with getattr(torch, mode)():
        y, h = selective_scan(x, dt, A, B, C, D, z, h0, chunk_size=chunk_size)
    assert_close(y, ref_y, 1e-5, "y")
    assert_close(h, ref_h, 1e-5, "final state")
    assert torch.equal(h0, h0_before), "the initial state passed in must not be modified"


def test_in_place_and_autograd_paths_agree():
    x, dt, A, B, C, D, z, h0 = _inputs(l=40)
    with torch.no_grad():
        y_fast, h_fast = selective_scan(x, dt, A, B, C, D, z, h0)
    y_grad, h_grad = selective_scan(x.requires_grad_(), dt, A, B, C, D, z, h0)
    assert y_grad.requires_grad
    assert_close(y_fast, y_grad.detach(), 1e-6, "y")
    assert_close(h_fast, h_grad.detach(), 1e-6, "final state")


@pytest.mark.parametrize("grad", [False, True], ids=["in_place", "autograd"])
def test_chunks_choose_their_branch_independently(grad):
    """One chunk decays far past the factorisation's range (log-depth branch), the others do not."""
    x, dt, A, B, C, D, z, h0 = _inputs(l=70, dt_scale=0.05)
    dt[:, 33:40] *= 2000  # only the second chunk of 32 steps decays by more than exp(-60)
    ref_y, ref_h = selective_scan_ref(x.double(), dt.double(), A.double(), B.double(), C.double(), D, z, h0.double())
    with torch.set_grad_enabled(grad):
        y, h = selective_scan(x.requires_grad_(grad), dt, A, B, C, D, z, h0, chunk_size=32)
    assert y.requires_grad == grad
    assert_close(y, ref_y, 1e-5, "y")
    assert_close(h, ref_h, 1e-5, "final state")
