"""selective_scan (chunked, both internal branches) and selective_scan_step against the sequential reference.

Shapes as in ssmblocks.ops.selective_scan: x, dt, z: (b, l, e); A: (e, n); B, C: (b, l, n); D: (e,);
initial_state: (b, e, n).
"""

from __future__ import annotations

import collections
import functools
import importlib

import pytest
import torch

from ssmblocks.ops import selective_scan, selective_scan_ref, selective_scan_step
from tests.helpers import assert_close, step_through

# ``ssmblocks.ops.selective_scan`` names the function (re-exported), so reach the module through importlib.
SCAN = importlib.import_module("ssmblocks.ops.selective_scan")


@pytest.fixture(autouse=True)
def torch_only(torch_path):
    """These tests hold the torch implementations; the C++ one that may replace them is tested in
    test_selective_scan_cpu_kernel.py."""


TOL64 = 1e-10  # float64 fast path vs float64 reference
TOL32 = 1e-5  # float32 fast path vs float64 reference on the same (float32-rounded) inputs
TOL32_GRAD = 1e-4  # float32 gradients vs float64 reference gradients
CHUNK = 8

# seqlen relative to CHUNK: a single token, inside one chunk, exactly one, ragged tail, an exact multiple
LENGTHS = {"l1": 1, "l5_lt_chunk": 5, "l8_one_chunk": 8, "l21_ragged": 21, "l24_three_chunks": 24}
# (e, n); the d_state=128 case keeps the other dims tiny
CHANNELS = {"e3_n1": (3, 1), "e5_n7": (5, 7), "e3_n16": (3, 16), "e2_n128": (2, 128)}
FEATURES = {"bare": (), "D": ("D",), "z": ("z",), "h0": ("h0",), "D_z_h0": ("D", "z", "h0")}
# The factorised branch needs every chunk to decay by at most exp(-_FACTORISED_LIMIT): CHUNK * 0.5 * 4 = 16 < 60.
# Large steps (dt up to 10, i.e. 100x a typical dt) with A down to -16 push chunks far past it: the log-depth branch.
BRANCHES = {"factorised": {"dt_scale": 0.5, "a_max": 4.0}, "log_depth": {"dt_scale": 10.0, "a_max": 16.0}}
DIFFERENTIABLE = ("x", "dt", "A", "B", "C", "D", "z", "initial_state")


def scan_inputs(
    b: int,
    l: int,
    e: int,
    n: int,
    features: tuple[str, ...] = ("D", "z", "h0"),
    dt_scale: float = 0.5,
    a_max: float = 4.0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Random keyword arguments for the scan ops; A reaches -a_max in every channel so a_max sets the decay."""
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


def cast(kw: dict[str, torch.Tensor], dtype: torch.dtype, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).clone().requires_grad_(requires_grad) for k, v in kw.items()}


def grads(
    fn, kw: dict[str, torch.Tensor], gy: torch.Tensor, gh: torch.Tensor, only: str | None = None, **extra
) -> dict[str, torch.Tensor]:
    """Gradients of <y, gy> + <final_state, gh> with respect to every input in kw (or to kw[only])."""
    y, h = fn(**kw, **extra)
    names = list(kw) if only is None else [only]
    out = torch.autograd.grad((y * gy.to(y.dtype)).sum() + (h * gh.to(h.dtype)).sum(), [kw[k] for k in names])
    return dict(zip(names, out, strict=True))


@pytest.fixture
def branches(monkeypatch):
    """Counts the calls of selective_scan's internal branches: 'in_place' (no autograd) and 'log_depth'."""
    calls = collections.Counter()

    def counting(key, original):
        def spy(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        return spy

    for name, key in (("_scan_in_place", "in_place"), ("_chunk_states_log_depth", "log_depth")):
        monkeypatch.setattr(SCAN, name, counting(key, getattr(SCAN, name)))
    return calls


def assert_branch(calls: collections.Counter, branch: str, autograd: bool) -> None:
    """The case ran through the branch it is meant to test."""
    if branch == "log_depth":
        assert calls["log_depth"] > 0, f"log-depth branch not taken: {dict(calls)}"
    else:
        assert calls["log_depth"] == 0, f"factorised case fell back to the log-depth branch: {dict(calls)}"
    assert (calls["in_place"] == 0) == autograd, f"in-place path taken={calls['in_place'] > 0}, autograd={autograd}"


# ---------------------------------------------------------------------------------------------- forward


def closed_form(x, dt, A, B, C, D=None, z=None, initial_state=None):
    """The recurrence unrolled (float64, tiny sizes): with S(s, t) = A * sum_{s<r<=t} dt_r,
    h_t = sum_{s<=t} exp(S(s, t)) dt_s x_s B_s + exp(A * sum_{r<=t} dt_r) h0;  y_t = (h_t C_t + D x_t) silu(z_t)."""
    l = x.shape[1]
    cum = dt.cumsum(1)  # (b, l, e)
    causal = torch.ones(l, l, dtype=torch.bool).tril()[None, :, :, None, None]  # (1, t, s, 1, 1)
    seg = (cum[:, :, None] - cum[:, None, :])[..., None] * A  # (b, t, s, e, n)
    decay = torch.where(causal, torch.exp(seg), 0.0)
    states = torch.einsum("btsen,bse,bsn->bten", decay, dt * x, B)
    if initial_state is not None:
        states = states + torch.exp(cum[..., None] * A) * initial_state[:, None]
    y = torch.einsum("bten,btn->bte", states, C)
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y, states[:, -1]


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
def test_reference_and_fast_path_follow_the_closed_form(features):
    """Fast path and reference share helpers, so both are also held to the unrolled formula of the docstring."""
    kw = scan_inputs(2, 6, 3, 4, features)
    expected_y, expected_h = closed_form(**kw)
    for name, fn in (("reference", selective_scan_ref), ("fast path", functools.partial(selective_scan, chunk_size=4))):
        y, h = fn(**kw)
        assert_close(y, expected_y, TOL64, f"{name} y")
        assert_close(h, expected_h, TOL64, f"{name} final state")


@pytest.mark.parametrize("autograd", [False, True], ids=["no_grad_path", "autograd_path"])
@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("e, n", CHANNELS.values(), ids=CHANNELS.keys())
@pytest.mark.parametrize("l", LENGTHS.values(), ids=LENGTHS.keys())
def test_forward_float64_matches_reference(l, e, n, features, autograd, branches):
    kw = scan_inputs(2, l, e, n, features)
    ref_y, ref_h = selective_scan_ref(**kw)
    y, h = selective_scan(**cast(kw, torch.float64, requires_grad=autograd), chunk_size=CHUNK)
    assert_branch(branches, "factorised", autograd)
    assert y.dtype == torch.float64
    assert_close(y, ref_y, TOL64, "y")
    assert_close(h, ref_h, TOL64, "final state")


@pytest.mark.parametrize("autograd", [False, True], ids=["no_grad_path", "autograd_path"])
@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("e, n", CHANNELS.values(), ids=CHANNELS.keys())
@pytest.mark.parametrize("l", LENGTHS.values(), ids=LENGTHS.keys())
def test_forward_float32_matches_float64_reference(l, e, n, features, autograd):
    kw32 = cast(scan_inputs(2, l, e, n, features), torch.float32)
    ref_y, ref_h = selective_scan_ref(**cast(kw32, torch.float64))
    y, h = selective_scan(**cast(kw32, torch.float32, requires_grad=autograd), chunk_size=CHUNK)
    assert y.dtype == torch.float32
    assert_close(y, ref_y, TOL32, "y")
    assert_close(h, ref_h, TOL32, "final state")


@pytest.mark.parametrize("autograd", [False, True], ids=["no_grad_path", "autograd_path"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("l", LENGTHS.values(), ids=LENGTHS.keys())
def test_log_depth_branch_matches_reference(l, dtype, autograd, branches):
    kw = cast(scan_inputs(2, l, 3, 7, **BRANCHES["log_depth"]), dtype)
    ref_y, ref_h = selective_scan_ref(**cast(kw, torch.float64))
    y, h = selective_scan(**cast(kw, dtype, requires_grad=autograd), chunk_size=CHUNK)
    assert_branch(branches, "log_depth", autograd)
    tol = TOL64 if dtype == torch.float64 else TOL32
    assert_close(y, ref_y, tol, "y")
    assert_close(h, ref_h, tol, "final state")


@pytest.mark.parametrize("dt_scale", [100.0, 1e4], ids=["dt_100", "dt_1e4"])
def test_log_depth_branch_stays_finite_in_float32(dt_scale, branches):
    """Decays far below float32's range (exp(-1e5)) give finite outputs, states and gradients."""
    kw = cast(scan_inputs(2, 19, 3, 5, dt_scale=dt_scale, a_max=16.0), torch.float32, requires_grad=True)
    y, h = selective_scan(**kw, chunk_size=CHUNK)
    assert_branch(branches, "log_depth", autograd=True)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    (y.sum() + h.sum()).backward()
    for name, t in kw.items():
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"
    ref_y, ref_h = selective_scan_ref(**cast(kw, torch.float64))
    assert_close(y, ref_y, TOL32, "y")
    assert_close(h, ref_h, TOL32, "final state")


@pytest.mark.parametrize("autograd", [False, True], ids=["no_grad_path", "autograd_path"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_log_depth_branch_when_only_whole_chunks_pass_the_limit(dtype, autograd, branches):
    """Every single step decays by less than exp(-_FACTORISED_LIMIT), a chunk of them by far more (exp(-370))."""
    kw = scan_inputs(2, 19, 3, 5, a_max=16.0)
    kw["dt"] = 0.75 * SCAN._FACTORISED_LIMIT / 16.0 * (1 - 0.05 * kw["dt"])  # per step decay 42..45
    kw = cast(kw, dtype)
    ref_y, ref_h = selective_scan_ref(**cast(kw, torch.float64))
    y, h = selective_scan(**cast(kw, dtype, requires_grad=autograd), chunk_size=CHUNK)
    assert_branch(branches, "log_depth", autograd)
    tol = TOL64 if dtype == torch.float64 else TOL32
    assert_close(y, ref_y, tol, "y")
    assert_close(h, ref_h, tol, "final state")


@pytest.mark.parametrize("autograd", [False, True], ids=["no_grad_path", "autograd_path"])
def test_factorised_branch_just_below_the_limit_in_float32(autograd, branches):
    """A chunk decaying by exp(-0.99 * _FACTORISED_LIMIT) still takes the factorised branch and stays accurate."""
    kw = scan_inputs(2, 2 * CHUNK, 3, 4, a_max=16.0)
    chunk_decay = kw["dt"].view(2, -1, CHUNK, 3).sum(2).amax() * 16.0
    kw["dt"] *= 0.99 * SCAN._FACTORISED_LIMIT / chunk_decay
    kw32 = cast(kw, torch.float32)
    ref_y, ref_h = selective_scan_ref(**cast(kw32, torch.float64))
    y, h = selective_scan(**cast(kw32, torch.float32, requires_grad=autograd), chunk_size=CHUNK)
    assert_branch(branches, "factorised", autograd)
    assert_close(y, ref_y, TOL32, "y")
    assert_close(h, ref_h, TOL32, "final state")
    if autograd:  # exp(+-59) factors in the backward too
        gy, gh = torch.randn_like(ref_y), torch.randn_like(ref_h)
        expected = grads(selective_scan_ref, cast(kw32, torch.float64, requires_grad=True), gy, gh)
        actual = grads(selective_scan, cast(kw32, torch.float32, requires_grad=True), gy, gh, chunk_size=CHUNK)
        for name in actual:
            assert_close(actual[name], expected[name], TOL32_GRAD, f"grad {name}")


# ---------------------------------------------------------------------------------------------- gradients

GRAD_LENGTHS = {"l5_lt_chunk": (5, 8), "l8_two_chunks": (8, 4), "l7_ragged": (7, 3)}  # (l, chunk_size)


@pytest.mark.parametrize("features", [("D", "z", "h0"), ()], ids=["D_z_h0", "bare"])
@pytest.mark.parametrize("branch", BRANCHES, ids=BRANCHES.keys())
@pytest.mark.parametrize("l, chunk_size", GRAD_LENGTHS.values(), ids=GRAD_LENGTHS.keys())
def test_gradients_match_reference(l, chunk_size, branch, features, branches):
    kw = scan_inputs(2, l, 3, 4, features, **BRANCHES[branch])
    gy, gh = torch.randn(2, l, 3, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    expected = grads(selective_scan_ref, cast(kw, torch.float64, requires_grad=True), gy, gh)
    actual = grads(selective_scan, cast(kw, torch.float64, requires_grad=True), gy, gh, chunk_size=chunk_size)
    assert_branch(branches, branch, autograd=True)
    assert set(actual) == {k for k in DIFFERENTIABLE if k in kw}
    for name in actual:
        assert_close(actual[name], expected[name], TOL64, f"grad {name}")


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_gradient_of_a_single_input(name, branches):
    """Only one input requires grad: the path choice (in-place when x, dt, A, B, C and h0 need no grad) stays right."""
    kw = scan_inputs(2, 11, 3, 4)
    gy, gh = torch.randn(2, 11, 3, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    ref = {k: v.clone().requires_grad_(k == name) for k, v in kw.items()}
    fast = {k: v.clone().requires_grad_(k == name) for k, v in kw.items()}
    expected = grads(selective_scan_ref, ref, gy, gh, only=name)
    actual = grads(selective_scan, fast, gy, gh, only=name, chunk_size=CHUNK)
    assert_branch(branches, "factorised", autograd=name not in ("D", "z"))
    assert_close(actual[name], expected[name], TOL64, f"grad {name}")


def test_gradients_float32_match_float64_reference():
    kw32 = cast(scan_inputs(2, 13, 3, 4), torch.float32)
    gy, gh = torch.randn(2, 13, 3, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    expected = grads(selective_scan_ref, cast(kw32, torch.float64, requires_grad=True), gy, gh)
    actual = grads(selective_scan, cast(kw32, torch.float32, requires_grad=True), gy, gh, chunk_size=CHUNK)
    for name in actual:
        assert_close(actual[name], expected[name], TOL32_GRAD, f"grad {name}")


@pytest.mark.parametrize("branch", BRANCHES, ids=BRANCHES.keys())
def test_gradcheck(branch, branches):
    kw = cast(scan_inputs(1, 5, 2, 3, **BRANCHES[branch]), torch.float64, requires_grad=True)
    names = list(kw)

    def fn(*args):
        return selective_scan(**dict(zip(names, args, strict=True)), chunk_size=2)

    assert torch.autograd.gradcheck(fn, tuple(kw.values()))
    assert_branch(branches, branch, autograd=True)


# ---------------------------------------------------------------------------------------------- chunk size


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("branch", BRANCHES, ids=BRANCHES.keys())
@pytest.mark.parametrize("chunk_size", [1, 5, 8])
def test_chunk_size_does_not_change_results(chunk_size, branch, dtype):
    """Any chunk size gives the results of a single chunk over the whole sequence (l=19 is prime)."""
    kw = cast(scan_inputs(2, 19, 3, 6, **BRANCHES[branch]), dtype)
    whole_y, whole_h = selective_scan(**kw, chunk_size=19)
    y, h = selective_scan(**kw, chunk_size=chunk_size)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert_close(y, whole_y, tol, "y")
    assert_close(h, whole_h, tol, "final state")


def test_initial_state_is_not_modified():
    kw = scan_inputs(2, 11, 3, 4)
    before = kw["initial_state"].clone()
    selective_scan(**kw, chunk_size=CHUNK)
    assert torch.equal(kw["initial_state"], before)


# ---------------------------------------------------------------------------------------------- dt_softplus


def raw_dt(kw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kw with dt replaced by values before softplus: both signs, and -inf (a padded position) at one step."""
    dt = torch.randn_like(kw["dt"]) * 2
    dt[:, 3] = -torch.inf
    return {**kw, "dt": dt}


@pytest.mark.parametrize("autograd", [False, True], ids=["no_grad", "autograd"])
def test_dt_softplus_is_the_scan_of_softplus_dt(autograd):
    kw = raw_dt(scan_inputs(2, 13, 3, 4))
    soft = {**kw, "dt": torch.nn.functional.softplus(kw["dt"])}
    assert torch.equal(soft["dt"][:, 3], torch.zeros_like(soft["dt"][:, 3]))  # -inf: no decay, no input
    expected = selective_scan_ref(**soft)
    for name, fn in (("reference", selective_scan_ref), ("fast path", functools.partial(selective_scan, chunk_size=4))):
        with torch.set_grad_enabled(autograd):
            y, h = fn(**kw, dt_softplus=True)
        assert_close(y, expected[0], TOL64, f"{name} y")
        assert_close(h, expected[1], TOL64, f"{name} final state")


def test_dt_softplus_gradients_match_reference():
    """Gradients through the softplus; at the -inf step dt's gradient is 0 and nothing turns NaN."""
    kw = raw_dt(scan_inputs(2, 13, 3, 4))
    gy, gh = torch.randn(2, 13, 3, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    expected = grads(selective_scan_ref, cast(kw, torch.float64, requires_grad=True), gy, gh, dt_softplus=True)
    actual = grads(selective_scan, cast(kw, torch.float64, requires_grad=True), gy, gh, chunk_size=4, dt_softplus=True)
    for name in actual:
        assert torch.isfinite(actual[name]).all(), name
        assert_close(actual[name], expected[name], TOL64, f"grad {name}")
    assert torch.equal(actual["dt"][:, 3], torch.zeros_like(actual["dt"][:, 3]))


# ---------------------------------------------------------------------------------------------- step


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
def test_step_by_step_matches_reference(features, dtype):
    kw = cast(scan_inputs(2, 7, 3, 5, features), dtype)
    ref_y, ref_h = selective_scan_ref(**cast(kw, torch.float64))
    state = kw.pop("initial_state").clone() if "h0" in features else torch.zeros(2, 3, 5, dtype=dtype)
    y = step_through(selective_scan_step, kw, state)  # the step returns y only: the state must be updated in place
    tol = TOL64 if dtype == torch.float64 else TOL32
    assert y.dtype == dtype
    assert_close(y, ref_y, tol, "y")
    assert_close(state, ref_h, tol, "state updated in place")


def test_step_updates_the_state_buffer_in_place():
    kw = scan_inputs(2, 1, 3, 5)
    state = kw["initial_state"].clone()
    buffer = state.data_ptr()
    selective_scan_step(kw["x"][:, 0], kw["dt"][:, 0], kw["A"], kw["B"][:, 0], kw["C"][:, 0], state)
    _, ref_h = selective_scan_ref(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], initial_state=kw["initial_state"])
    assert state.data_ptr() == buffer
    assert_close(state, ref_h, TOL64, "state after one step")


def test_step_with_dt_softplus_matches_reference():
    kw = raw_dt(scan_inputs(2, 7, 3, 5))
    ref_y, ref_h = selective_scan_ref(**kw, dt_softplus=True)
    state = kw.pop("initial_state").clone()
    y = step_through(functools.partial(selective_scan_step, dt_softplus=True), kw, state)
    assert_close(y, ref_y, TOL64, "y")
    assert_close(state, ref_h, TOL64, "state")


def test_prefill_then_steps_matches_reference():
    """The final state of a chunked prefill continues correctly through the step op."""
    kw = scan_inputs(2, 12, 3, 5)
    ref_y, ref_h = selective_scan_ref(**kw)
    sequence = ("x", "dt", "B", "C", "z")
    head = {k: v[:, :9] if k in sequence else v for k, v in kw.items()}
    tail = {k: v[:, 9:] if k in sequence else v for k, v in kw.items() if k != "initial_state"}
    y_head, state = selective_scan(**head, chunk_size=4)
    y_tail = step_through(selective_scan_step, tail, state)
    assert_close(torch.cat([y_head, y_tail], dim=1), ref_y, TOL64, "y")
    assert_close(state, ref_h, TOL64, "final state")
