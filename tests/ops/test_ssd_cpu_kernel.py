"""The C++ CPU kernel that ssd_scan runs without autograd (ssd_scan: the recurrence one time step after
another), against the float64 reference ssd_ref.

It works on blocks of 256 bytes of a head's p columns (64 float32, 32 float64), so p = 70 has two blocks and a
partial one; with b = 2 the threads' shares of the (head, block) units cross batch boundaries.
"""

from __future__ import annotations

import pytest
import torch

from ssmblocks.ops import ssd_ref, ssd_scan
from tests.helpers import assert_close
from tests.ops.test_ssd import FEATURES, cast, ssd_inputs

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
LAYOUTS = {  # (b, l, h, g, p, n)
    "b1_l1_h1_g1_p1_n1": (1, 1, 1, 1, 1, 1),
    "b2_l37_h4_g2_p3_n7": (2, 37, 4, 2, 3, 7),
    "b2_l21_h6_g3_p70_n16": (2, 21, 6, 3, 70, 16),
    "b1_l9_h2_g1_p64_n128": (1, 9, 2, 1, 64, 128),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_kernel_matches_reference(kernel_calls, layout, features, dtype):
    b, l, h, g, p, n = layout
    kw = ssd_inputs(b, l, h, g, p, n, features)
    y_ref, s_ref = ssd_ref(**kw)
    inputs = cast(kw, dtype)
    before = {k: v.clone() for k, v in inputs.items()}
    with torch.no_grad():
        y, s = ssd_scan(**inputs)
    assert len(kernel_calls) == 1
    assert y.dtype == dtype and s.dtype == dtype
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(s, s_ref, TOL[dtype], "final state")
    assert all(torch.equal(v, before[k]) for k, v in inputs.items()), "an input was modified"


def test_strided_inputs_and_long_decay(kernel_calls):
    """Views into a larger tensor (as the layer's split of the conv output) and decays far past exp(-60)."""
    b, l, h, g, p, n = 2, 300, 4, 2, 8, 5
    kw = ssd_inputs(b, l, h, g, p, n, ("D", "h0"), dt_scale=2.0, a_max=8.0)
    whole = torch.cat([kw["x"].flatten(2), kw["B"].flatten(2), kw["C"].flatten(2)], dim=-1)
    x, B, C = whole.split([h * p, g * n, g * n], dim=-1)
    views = dict(kw, x=x.unflatten(-1, (h, p)), B=B.unflatten(-1, (g, n)), C=C.unflatten(-1, (g, n)))
    assert not views["x"].is_contiguous()
    y_ref, s_ref = ssd_ref(**kw)
    with torch.no_grad():
        y, s = ssd_scan(**cast(views, torch.float32))
    assert len(kernel_calls) == 1
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(s, s_ref, 1e-5, "final state")


def test_autograd_and_bfloat16_paths_keep_torch(kernel_calls):
    kw = ssd_inputs(1, 5, 2, 1, 3, 4)
    ssd_scan(**cast(kw, torch.float32, requires_grad=True))
    with torch.no_grad():
        y, _ = ssd_scan(**cast(kw, torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert len(kernel_calls) == 1  # bf16 runs it in float32 (the working dtype); autograd never
