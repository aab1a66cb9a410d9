"""The fused C++ CPU kernels that selective_scan and selective_scan_step run without autograd, against the
float64 reference.

Shapes as in ssmblocks.ops.selective_scan: x, dt, z: (b, l, e); A: (e, n); B, C: (b, l, n); D: (e,);
initial_state: (b, e, n). The scan works on groups of 128 bytes of channels (32 float32, 16 float64), so
e = 45 has a partial last group and e = 1, 3 only a partial one; with b = 3 the threads' shares of the
(batch, group) pairs cross batch boundaries. The step vectorises along n (16 float32 with AVX-512), so
n = 5 and 20 leave values for its scalar tail.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.utils.cpp_extension

from ssmblocks.backends.cpp_kernels import library
from ssmblocks.ops import selective_scan, selective_scan_ref, selective_scan_step
from tests.helpers import assert_close, step_through

TOL = {torch.float64: 1e-12, torch.float32: 5e-6}  # relative to the largest |value|, vs the float64 reference
SHAPES = {  # (b, l, e, n): l never a multiple of 16, e odd
    "b1_l1_e3_n1": (1, 1, 3, 1),
    "b2_l7_e1_n5": (2, 7, 1, 5),
    "b3_l37_e45_n16": (3, 37, 45, 16),
    "b2_l19_e33_n5": (2, 19, 33, 5),
}
FEATURES = {"bare": (), "D": ("D",), "z": ("z",), "h0": ("h0",), "D_z_h0": ("D", "z", "h0")}


def scan_inputs(b, l, e, n, features=("D", "z", "h0"), dt_scale=0.5, a_max=4.0, dtype=torch.float64):
    """Random keyword arguments for selective_scan; A reaches -a_max in every channel."""
    A = -torch.rand(e, n, dtype=dtype) * a_max
    A[:, 0] = -a_max
    kw = {
        "x": torch.randn(b, l, e, dtype=dtype),
        "dt": torch.rand(b, l, e, dtype=dtype) * dt_scale,
        "A": A,
        "B": torch.randn(b, l, n, dtype=dtype),
        "C": torch.randn(b, l, n, dtype=dtype),
    }
    if "D" in features:
        kw["D"] = torch.randn(e, dtype=dtype)
    if "z" in features:
        kw["z"] = torch.randn(b, l, e, dtype=dtype)
    if "h0" in features:
        kw["initial_state"] = torch.randn(b, e, n, dtype=dtype)
    return kw


def reference(kw):
    return selective_scan_ref(**{k: v.double() for k, v in kw.items()})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_kernel_matches_reference(shape, features, dtype, kernel_calls):
    kw = scan_inputs(*shape, features, dtype=dtype)
    before = kw.get("initial_state", torch.empty(0)).clone()
    with torch.no_grad():
        y, h = selective_scan(**kw)
    assert kernel_calls == ["selective_scan"]
    assert y.dtype == h.dtype == dtype
    ref_y, ref_h = reference(kw)
    assert_close(y, ref_y, TOL[dtype], "y")
    assert_close(h, ref_h, TOL[dtype], "final state")
    assert torch.equal(kw.get("initial_state", torch.empty(0)), before), "initial_state modified"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("dt_scale", [10.0, 100.0, 1e4], ids=["dt_10", "dt_100", "dt_1e4"])
def test_extreme_decays(dt_scale, dtype, kernel_calls):
    """Steps that decay the state by up to exp(-1.6e5) (far below float32's range): finite and exact."""
    kw = scan_inputs(2, 37, 45, 16, dt_scale=dt_scale, a_max=16.0, dtype=dtype)
    with torch.inference_mode():
        y, h = selective_scan(**kw)
    assert kernel_calls == ["selective_scan"]
    ref_y, ref_h = reference(kw)
    assert_close(y, ref_y, TOL[dtype], "y")
    assert_close(h, ref_h, TOL[dtype], "final state")


def test_strided_and_mixed_dtype_inputs(kernel_calls):
    """The layer's views (B, C split from one projection, z a half of another, x transposed) and bfloat16
    activations with float32 parameters: y in x's dtype, computed in float32."""
    b, l, e, n = 2, 21, 45, 5
    kw = scan_inputs(b, l, e, n, dtype=torch.float32)
    projection = torch.cat([torch.randn(b, l, 3), kw["B"], kw["C"]], dim=-1)
    kw["B"], kw["C"] = projection[..., 3 : 3 + n], projection[..., 3 + n :]
    kw["z"] = torch.cat([torch.randn(b, l, e), kw["z"]], dim=-1)[..., e:]
    kw["x"] = kw["x"].transpose(1, 2).contiguous().transpose(1, 2)
    with torch.no_grad():
        y, h = selective_scan(**kw)
        y16, _ = selective_scan(**{**kw, "x": kw["x"].bfloat16(), "z": kw["z"].bfloat16()})
    assert kernel_calls == ["selective_scan", "selective_scan"]
    ref_y, ref_h = reference(kw)
    assert_close(y, ref_y, TOL[torch.float32], "y")
    assert_close(h, ref_h, TOL[torch.float32], "final state")
    assert y16.dtype == torch.bfloat16
    ref_y16, _ = reference({**kw, "x": kw["x"].bfloat16().float(), "z": kw["z"].bfloat16().float()})
    assert_close(y16, ref_y16, 1e-2, "y from bfloat16 x, z")


@pytest.mark.parametrize("name", ["x", "dt", "A", "B", "C", "D", "z", "initial_state"])
def test_autograd_takes_the_torch_path(name, kernel_calls):
    """Any input that needs a gradient keeps selective_scan on the differentiable torch path."""
    kw = {k: v.requires_grad_(k == name) for k, v in scan_inputs(2, 11, 3, 4).items()}
    y, h = selective_scan(**kw)
    assert not kernel_calls
    ref = {k: v.detach().clone().requires_grad_(k == name) for k, v in kw.items()}
    ref_y, ref_h = selective_scan_ref(**ref)
    gy, gh = torch.randn_like(ref_y), torch.randn_like(ref_h)
    (grad,) = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), kw[name])
    (ref_grad,) = torch.autograd.grad((ref_y * gy).sum() + (ref_h * gh).sum(), ref[name])
    assert_close(grad, ref_grad, 1e-10, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_kernels_take_dt_before_softplus(dtype, kernel_calls):
    """dt_softplus=True: the scan and the step of softplus(dt), dt of both signs."""
    kw = {**scan_inputs(2, 19, 33, 5, dtype=dtype), "dt": torch.randn(2, 19, 33, dtype=dtype) * 2}
    ref_y, ref_h = selective_scan_ref(**{k: v.double() for k, v in kw.items()}, dt_softplus=True)
    state = kw["initial_state"].clone()
    with torch.no_grad():
        y, h = selective_scan(**kw, dt_softplus=True)
        y_steps = step_through(functools.partial(selective_scan_step, dt_softplus=True), kw, state)
    assert kernel_calls == ["selective_scan"] + ["selective_scan_step"] * 19
    assert_close(y, ref_y, TOL[dtype], "y")
    assert_close(h, ref_h, TOL[dtype], "final state")
    assert_close(y_steps, ref_y, TOL[dtype], "y of the steps")
    assert_close(state, ref_h, TOL[dtype], "state after the steps")


STEP_SHAPES = {"b1_e3_n1": (1, 3, 1), "b2_e5_n5": (2, 5, 5), "b3_e45_n16": (3, 45, 16), "b2_e7_n20": (2, 7, 20)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("shape", STEP_SHAPES.values(), ids=STEP_SHAPES.keys())
def test_step_kernel_matches_reference(shape, features, dtype, kernel_calls):
    """Token after token, the state updated in place in its own buffer."""
    b, e, n = shape
    kw = scan_inputs(b, 6, e, n, features, dtype=dtype)
    state = kw.pop("initial_state").clone() if "h0" in features else torch.zeros(b, e, n, dtype=dtype)
    buffer = state.data_ptr()
    ref_y, ref_h = reference({**kw, "initial_state": state.clone()})
    with torch.no_grad():
        y = step_through(selective_scan_step, kw, state)
    assert kernel_calls == ["selective_scan_step"] * 6
    assert state.data_ptr() == buffer
    assert y.dtype == dtype
    assert_close(y, ref_y, TOL[dtype], "y")
    assert_close(state, ref_h, TOL[dtype], "state")


def test_step_kernel_in_parallel(kernel_calls):
    """Enough channels (b e n >= 2 x 32k) for the step to split them over threads, across batch elements."""
    kw = scan_inputs(3, 2, 1500, 16, dtype=torch.float32)
    state = kw.pop("initial_state").clone()
    ref_y, ref_h = reference({**kw, "initial_state": state.clone()})
    with torch.inference_mode():
        y = step_through(selective_scan_step, kw, state)
    assert kernel_calls == ["selective_scan_step"] * 2
    assert_close(y, ref_y, TOL[torch.float32], "y")
    assert_close(state, ref_h, TOL[torch.float32], "state")


@pytest.mark.parametrize("case", ["state_float64", "state_strided", "autograd"])
def test_step_takes_the_torch_path(case, kernel_calls):
    """A state the kernel cannot update in place (another dtype, not contiguous), or a gradient."""
    kw = scan_inputs(2, 1, 3, 4, dtype=torch.float32)
    state = kw.pop("initial_state")
    if case == "state_float64":
        state = state.double()
    elif case == "state_strided":
        state = state.transpose(1, 2).contiguous().transpose(1, 2)
    ref_y, ref_h = reference({**kw, "initial_state": state.clone()})
    args = [kw[k][:, 0] if k in ("x", "dt", "B", "C", "z") else kw[k] for k in ("x", "dt", "A", "B", "C")]
    with torch.set_grad_enabled(case == "autograd"):
        y = selective_scan_step(*args, state, kw["D"].requires_grad_(case == "autograd"), kw["z"][:, 0])
    assert not kernel_calls
    assert_close(y, ref_y[:, 0], TOL[torch.float32], "y")
    assert_close(state, ref_h, TOL[torch.float32], "state")


def test_no_kernel_while_compiling(monkeypatch, kernel_calls):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kw = scan_inputs(1, 5, 3, 4)
    with torch.no_grad():
        y, _ = selective_scan(**kw)
    assert not kernel_calls
    assert_close(y, reference(kw)[0], 1e-10, "y")


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built.*no C\\+\\+ compiler"):
            assert library() is None
        kw = scan_inputs(2, 9, 3, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call is cached: no second warning
            with torch.no_grad():
                y, h = selective_scan(**kw)
        ref_y, ref_h = reference(kw)
        assert_close(y, ref_y, 1e-10, "y")
        assert_close(h, ref_h, 1e-10, "final state")
    finally:
        library.cache_clear()  # the next caller loads the real build again
