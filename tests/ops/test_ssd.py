"""ssd_scan and ssd_step against the sequential reference ssd_ref.

Shapes as in ssmblocks.ops.ssd: x, z: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n);
D: (h,) or (h, p); initial_state: (b, h, p, n).
"""

from __future__ import annotations

import functools

import pytest
import torch

from ssmblocks.ops import ssd_ref, ssd_scan, ssd_step
from tests.helpers import assert_close, step_through

TOL64 = 1e-10  # float64 fast path vs float64 reference
TOL32 = 1e-5  # float32 fast path vs float64 reference on the same (float32-rounded) inputs
TOL32_GRAD = 1e-4  # float32 gradients vs float64 reference gradients
CHUNK = 8

# seqlen relative to CHUNK: a single token, inside one chunk, exactly one, ragged tail, an exact multiple
LENGTHS = {"l1": 1, "l5_lt_chunk": 5, "l8_one_chunk": 8, "l21_ragged": 21, "l24_three_chunks": 24}
# (h, g, p, n): groups > 1 with several heads per group, odd head dims, d_state from 1 to 128 (kept tiny there)
LAYOUTS = {
    "h4_g2_p3_n7": (4, 2, 3, 7),
    "h6_g3_p5_n16": (6, 3, 5, 16),
    "h3_g1_p16_n1": (3, 1, 16, 1),
    "h4_g4_p2_n5": (4, 4, 2, 5),
    "h4_g2_p3_n128": (4, 2, 3, 128),
}
FEATURES = {
    "bare": (),
    "D_h": ("D",),
    "D_hp": ("D_hp",),
    "z": ("z",),
    "h0": ("h0",),
    "D_hp_z_h0": ("D_hp", "z", "h0"),
}
DIFFERENTIABLE = ("x", "dt", "A", "B", "C", "D", "z", "initial_state")


@pytest.fixture(autouse=True)
def torch_only(torch_path):
    """These tests hold the torch implementations; the C++ one that may replace ssd_scan is tested in
    test_ssd_cpu_kernel.py."""


def ssd_inputs(
    b: int,
    l: int,
    h: int,
    g: int,
    p: int,
    n: int,
    features: tuple[str, ...] = ("D", "z", "h0"),
    dt_scale: float = 1.0,
    a_max: float = 4.0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Random keyword arguments for the SSD ops. features: "D" (h,), "D_hp" (h, p), "z", "h0"."""
    kw = {
        "x": torch.randn(b, l, h, p, dtype=dtype),
        "dt": torch.rand(b, l, h, dtype=dtype) * dt_scale,
        "A": -torch.rand(h, dtype=dtype) * a_max,
        "B": torch.randn(b, l, g, n, dtype=dtype),
        "C": torch.randn(b, l, g, n, dtype=dtype),
    }
    if "D" in features:
        kw["D"] = torch.randn(h, dtype=dtype)
    if "D_hp" in features:
        kw["D"] = torch.randn(h, p, dtype=dtype)
    if "z" in features:
        kw["z"] = torch.randn(b, l, h, p, dtype=dtype)
    if "h0" in features:
        kw["initial_state"] = torch.randn(b, h, p, n, dtype=dtype)
    return kw


def cast(kw: dict[str, torch.Tensor], dtype: torch.dtype, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).clone().requires_grad_(requires_grad) for k, v in kw.items()}


def grads(fn, kw: dict[str, torch.Tensor], gy: torch.Tensor, gs: torch.Tensor, **extra) -> dict[str, torch.Tensor]:
    """Gradients of <y, gy> + <final_state, gs> with respect to every input in kw."""
    y, s = fn(**kw, **extra)
    names = list(kw)
    out = torch.autograd.grad((y * gy.to(y.dtype)).sum() + (s * gs.to(s.dtype)).sum(), [kw[k] for k in names])
    return dict(zip(names, out, strict=True))


# ---------------------------------------------------------------------------------------------- forward


def closed_form(x, dt, A, B, C, D=None, z=None, initial_state=None):
    """The recurrence unrolled (float64, tiny sizes), head i reading group i // (h / g): with
    S(s, t) = A * sum_{s<r<=t} dt_r,  h_t = sum_{s<=t} exp(S(s, t)) dt_s x_s B_s^T + exp(A * sum_{r<=t} dt_r) h0;
    y_t = (h_t C_t + D x_t) silu(z_t)."""
    l, h, g = x.shape[1], x.shape[2], B.shape[2]
    group = torch.tensor([i * g // h for i in range(h)])
    B, C = B[:, :, group], C[:, :, group]  # (b, l, h, n)
    cum = dt.cumsum(1)  # (b, l, h)
    causal = torch.ones(l, l, dtype=torch.bool).tril()[None, :, :, None]  # (1, t, s, 1)
    decay = torch.where(causal, torch.exp((cum[:, :, None] - cum[:, None, :]) * A), 0.0)  # (b, t, s, h)
    states = torch.einsum("btsh,bsh,bshp,bshn->bthpn", decay, dt, x, B)
    if initial_state is not None:
        states = states + torch.exp(cum * A)[..., None, None] * initial_state[:, None]
    y = torch.einsum("bthpn,bthn->bthp", states, C)
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y, states[:, -1]


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("h, g", [(4, 2), (6, 3)], ids=["h4_g2", "h6_g3"])
def test_reference_and_fast_path_follow_the_closed_form(h, g, features):
    """Fast path and reference share helpers, so both are also held to the unrolled formula of the docstring."""
    kw = ssd_inputs(2, 6, h, g, 3, 4, features)
    expected_y, expected_s = closed_form(**kw)
    for name, fn in (("reference", ssd_ref), ("fast path", functools.partial(ssd_scan, chunk_size=4))):
        y, s = fn(**kw)
        assert_close(y, expected_y, TOL64, f"{name} y")
        assert_close(s, expected_s, TOL64, f"{name} final state")


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("h, g, p, n", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("l", LENGTHS.values(), ids=LENGTHS.keys())
def test_forward_float64_matches_reference(l, h, g, p, n, features):
    kw = ssd_inputs(2, l, h, g, p, n, features)
    ref_y, ref_s = ssd_ref(**kw)
    y, s = ssd_scan(**kw, chunk_size=CHUNK)
    assert y.dtype == torch.float64
    assert_close(y, ref_y, TOL64, "y")
    assert_close(s, ref_s, TOL64, "final state")


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("h, g, p, n", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("l", LENGTHS.values(), ids=LENGTHS.keys())
def test_forward_float32_matches_float64_reference(l, h, g, p, n, features):
    kw32 = cast(ssd_inputs(2, l, h, g, p, n, features), torch.float32)
    ref_y, ref_s = ssd_ref(**cast(kw32, torch.float64))
    y, s = ssd_scan(**kw32, chunk_size=CHUNK)
    assert y.dtype == torch.float32
    assert_close(y, ref_y, TOL32, "y")
    assert_close(s, ref_s, TOL32, "final state")


def test_bfloat16_input_returns_bfloat16():
    kw = cast(ssd_inputs(1, 11, 4, 2, 3, 5), torch.bfloat16)
    ref_y, ref_s = ssd_ref(**cast(kw, torch.float64))
    y, s = ssd_scan(**kw, chunk_size=CHUNK)
    assert y.dtype == torch.bfloat16
    assert_close(y, ref_y, 1e-2, "y")  # bfloat16 keeps 8 significant bits
    assert_close(s, ref_s, TOL32, "final state")  # the state stays in float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("chunk_size", [64, 256])
def test_long_sequence_with_huge_cumulative_decay(chunk_size, dtype):
    """L=300 with large steps: the cumulative log decay inside a chunk reaches thousands (exp underflows in any
    dtype) while neighbouring tokens still interact; outputs stay finite and equal the reference."""
    kw = ssd_inputs(2, 300, 4, 2, 3, 8, dt_scale=2.0)
    kw["A"] = torch.tensor([-16.0, -4.0, -0.5, -0.01], dtype=torch.float64)  # fast to slow heads
    kw = cast(kw, dtype)
    cumulative = (kw["dt"].double() * kw["A"].double()).cumsum(1)
    assert cumulative.min() < -3000, "the case must reach a huge cumulative decay"
    ref_y, ref_s = ssd_ref(**cast(kw, torch.float64))
    y, s = ssd_scan(**kw, chunk_size=chunk_size)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    tol = TOL64 if dtype == torch.float64 else TOL32
    for head in range(4):  # each head on its own scale: the slow heads' large outputs would hide the fast ones
        assert_close(y[:, :, head], ref_y[:, :, head], tol, f"y of head {head}")
        assert_close(s[:, head], ref_s[:, head], tol, f"final state of head {head}")
    # gradients too: finite (no inf * 0 from the masked decay matrix), and equal to the reference's in float64
    gy, gs = torch.randn_like(ref_y), torch.randn_like(ref_s)
    actual = grads(ssd_scan, cast(kw, dtype, requires_grad=True), gy, gs, chunk_size=chunk_size)
    for name, g in actual.items():
        assert torch.isfinite(g).all(), f"non-finite gradient for {name}"
    if dtype == torch.float64:
        expected = grads(ssd_ref, cast(kw, dtype, requires_grad=True), gy, gs)
        for name, g in actual.items():
            assert_close(g, expected[name], TOL64, f"grad {name}")


def test_initial_state_is_not_modified():
    kw = ssd_inputs(2, 11, 4, 2, 3, 5)
    before = kw["initial_state"].clone()
    ssd_scan(**kw, chunk_size=CHUNK)
    assert torch.equal(kw["initial_state"], before)


# ---------------------------------------------------------------------------------------------- gradients

GRAD_LENGTHS = {"l5_lt_chunk": (5, 8), "l8_two_chunks": (8, 4), "l7_ragged": (7, 3)}  # (l, chunk_size)
GRAD_FEATURES = {"bare": (), "D_h_z_h0": ("D", "z", "h0"), "D_hp_z_h0": ("D_hp", "z", "h0")}


@pytest.mark.parametrize("features", GRAD_FEATURES.values(), ids=GRAD_FEATURES.keys())
@pytest.mark.parametrize("l, chunk_size", GRAD_LENGTHS.values(), ids=GRAD_LENGTHS.keys())
def test_gradients_match_reference(l, chunk_size, features):
    kw = ssd_inputs(2, l, 4, 2, 3, 5, features)
    gy, gs = torch.randn(2, l, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, 5, dtype=torch.float64)
    expected = grads(ssd_ref, cast(kw, torch.float64, requires_grad=True), gy, gs)
    actual = grads(ssd_scan, cast(kw, torch.float64, requires_grad=True), gy, gs, chunk_size=chunk_size)
    assert set(actual) == {k for k in DIFFERENTIABLE if k in kw}
    for name in actual:
        assert_close(actual[name], expected[name], TOL64, f"grad {name}")


def test_gradients_float32_match_float64_reference():
    kw32 = cast(ssd_inputs(2, 13, 4, 2, 3, 5, ("D_hp", "z", "h0")), torch.float32)
    gy, gs = torch.randn(2, 13, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, 5, dtype=torch.float64)
    expected = grads(ssd_ref, cast(kw32, torch.float64, requires_grad=True), gy, gs)
    actual = grads(ssd_scan, cast(kw32, torch.float32, requires_grad=True), gy, gs, chunk_size=CHUNK)
    for name in actual:
        assert_close(actual[name], expected[name], TOL32_GRAD, f"grad {name}")


@pytest.mark.parametrize("d_shape", ["D", "D_hp"], ids=["D_h", "D_hp"])
def test_gradcheck(d_shape):
    kw = cast(ssd_inputs(1, 5, 4, 2, 2, 2, (d_shape, "z", "h0")), torch.float64, requires_grad=True)
    names = list(kw)

    def fn(*args):
        return ssd_scan(**dict(zip(names, args, strict=True)), chunk_size=2)

    assert torch.autograd.gradcheck(fn, tuple(kw.values()))


# ---------------------------------------------------------------------------------------------- chunk size


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunk_size_does_not_change_results(chunk_size, dtype):
    """Any chunk size gives the results of the reference and of a single chunk over the whole sequence."""
    kw = cast(ssd_inputs(2, 20, 4, 2, 3, 5), dtype)
    whole_y, whole_s = ssd_scan(**kw, chunk_size=20)
    ref_y, ref_s = ssd_ref(**cast(kw, torch.float64))
    y, s = ssd_scan(**kw, chunk_size=chunk_size)
    tol = TOL64 if dtype == torch.float64 else TOL32
    assert_close(y, ref_y, tol, "y vs reference")
    assert_close(s, ref_s, tol, "final state vs reference")
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert_close(y, whole_y, tol, "y vs one chunk")
    assert_close(s, whole_s, tol, "final state vs one chunk")


# ---------------------------------------------------------------------------------------------- step


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
def test_step_by_step_matches_reference(features, dtype):
    kw = cast(ssd_inputs(2, 7, 4, 2, 3, 5, features), dtype)
    ref_y, ref_s = ssd_ref(**cast(kw, torch.float64))
    state = kw.pop("initial_state").clone() if "h0" in features else torch.zeros(2, 4, 3, 5, dtype=dtype)
    y = step_through(ssd_step, kw, state)  # the step returns y only: the state must be updated in place
    tol = TOL64 if dtype == torch.float64 else TOL32
    assert y.dtype == dtype
    assert_close(y, ref_y, tol, "y")
    assert_close(state, ref_s, tol, "state updated in place")


def test_step_updates_the_state_buffer_in_place():
    kw = ssd_inputs(2, 1, 4, 2, 3, 5)
    state = kw["initial_state"].clone()
    buffer = state.data_ptr()
    ssd_step(kw["x"][:, 0], kw["dt"][:, 0], kw["A"], kw["B"][:, 0], kw["C"][:, 0], state)
    _, ref_s = ssd_ref(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], initial_state=kw["initial_state"])
    assert state.data_ptr() == buffer
    assert_close(state, ref_s, TOL64, "state after one step")


def test_prefill_then_steps_matches_reference():
    """The final state of a chunked prefill continues correctly through the step op."""
    kw = ssd_inputs(2, 12, 4, 2, 3, 5, ("D_hp", "z", "h0"))
    ref_y, ref_s = ssd_ref(**kw)
    sequence = ("x", "dt", "B", "C", "z")
    head = {k: v[:, :9] if k in sequence else v for k, v in kw.items()}
    tail = {k: v[:, 9:] if k in sequence else v for k, v in kw.items() if k != "initial_state"}
    y_head, state = ssd_scan(**head, chunk_size=4)
    y_tail = step_through(ssd_step, tail, state)
    assert_close(torch.cat([y_head, y_tail], dim=1), ref_y, TOL64, "y")
    assert_close(state, ref_s, TOL64, "final state")
