"""The Triton selective scan (kernels/selective_scan.py) against selective_scan_ref in float64: forward, final
state and every gradient; the decode step against selective_scan_step_torch; the custom ops' registrations;
and the dispatch picking them for SelectiveSSM under the "triton" selection.

On a machine without CUDA the kernels run in Triton's interpreter (conftest.py), so shapes stay tiny.
"""

import itertools

import pytest
import torch

from ssmblocks import backends
from ssmblocks.layers import SelectiveSSM
from ssmblocks.ops.selective_scan import selective_scan_ref, selective_scan_step_torch
from tests.helpers import assert_close, backward_one_output, randomise

pytest.importorskip("triton")
from ssmblocks.kernels import selective_scan as kernels  # noqa: E402
from ssmblocks.kernels.selective_scan import (  # noqa: E402
    prepare_dt_ref,
    selective_scan_bwd,
    selective_scan_fwd,
    selective_scan_step,
    selective_scan_step_triton,
    selective_scan_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5  # float32 kernels against a float64 reference
TOL_BF16 = 3e-2  # bfloat16 inputs and outputs, float32 arithmetic

CASES = {
    # name: (b, l, e, n, chunk, D, z, dt_bias, softplus, initial state, dt scale)
    "plain": (1, 20, 8, 4, 8, False, False, False, False, False, 0.5),
    "D-z-bias-softplus-init": (2, 21, 12, 6, 8, True, True, True, True, True, 0.5),
    "chunk16-large-decay-D-init": (1, 19, 6, 5, 16, True, False, False, False, True, 5.0),
    "chunk4-D-z-bias-softplus": (2, 23, 10, 16, 4, True, True, True, True, False, 0.5),
}


def make_inputs(b, l, e, n, has_d, has_z, has_bias, has_init, dt_scale=0.5, dtype=torch.float32):
    """Random leaves on DEVICE, in selective_scan_triton's argument names; A in [-4, -0.5]."""
    kw = dict(
        x=torch.randn(b, l, e),
        dt=torch.randn(b, l, e) * 0.5 if has_bias else torch.rand(b, l, e) * dt_scale,
        A=-torch.rand(e, n) * 3.5 - 0.5,
        B=torch.randn(b, l, n),
        C=torch.randn(b, l, n),
        D=torch.randn(e) if has_d else None,
        z=torch.randn(b, l, e) if has_z else None,
        dt_bias=torch.randn(e) * 0.3 if has_bias else None,
        initial_state=torch.randn(b, e, n) if has_init else None,
    )
    floats = ("x", "B", "C", "z")  # A, D, dt_bias and the state stay float32, as in SelectiveSSM
    return {
        k: None if v is None else v.to(DEVICE, dtype if k in floats else torch.float32).requires_grad_(True)
        for k, v in kw.items()
    }


def reference(kw, dt_softplus):
    """selective_scan_ref in float64 on float64 copies of kw's leaves; returns (y, final, leaves)."""
    leaves = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in kw.items()}
    dt = prepare_dt_ref(leaves["dt"], leaves["dt_bias"], dt_softplus).double()
    args = (leaves["x"], dt, leaves["A"], leaves["B"], leaves["C"], leaves["D"], leaves["z"])
    y, final = selective_scan_ref(*args, leaves["initial_state"])
    return y, final, leaves


def check_against_reference(kw, softplus, chunk, tol):
    y, final = selective_scan_triton(**kw, dt_softplus=softplus, chunk_size=chunk)
    assert_matches_reference(kw, (y, final), reference(kw, softplus), tol)


def assert_matches_reference(kw, outputs, expected, tol):
    """y and the final state, then every leaf's gradient from random output gradients, against the reference's
    (y_ref, final_ref, ref_leaves)."""
    (y, final), (y_ref, final_ref, ref_leaves) = outputs, expected
    assert y.dtype == kw["x"].dtype and final.dtype == torch.float32
    assert_close(y, y_ref, tol, "y")
    assert_close(final, final_ref, tol, "final_state")

    dy, dfinal = torch.randn_like(y_ref), torch.randn_like(final_ref)
    torch.autograd.backward((y, final), (dy.to(y), dfinal.to(final)))
    torch.autograd.backward((y_ref, final_ref), (dy, dfinal))
    for name, leaf in kw.items():
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype, name
            assert_close(leaf.grad, ref_leaves[name].grad, tol, f"d{name}")


@pytest.mark.parametrize("channel_blocks", ["narrow-batch", "full"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_and_gradients(case, channel_blocks, monkeypatch):
    """Tiny batches get one channel per forward program; "full" keeps the forward's 8-channel blocks (with
    partly masked ones), as on a GPU-sized batch. The backward walks each sequence in one program (no GPU
    to size segments for)."""
    if channel_blocks == "full":
        monkeypatch.setattr(kernels, "_FWD_MIN_PROGRAMS", 0)
    b, l, e, n, chunk, has_d, has_z, has_bias, softplus, has_init, dt_scale = CASES[case]
    kw = make_inputs(b, l, e, n, has_d, has_z, has_bias, has_init, dt_scale)
    check_against_reference(kw, softplus, chunk, TOL)


@pytest.mark.parametrize("used", [0, 1], ids=["y", "final_state"])
def test_one_output_used(used):
    """A loss of y alone or of the final state alone (which depends on neither C, D nor z): the other output's
    gradient is None, not zeros."""
    kw = make_inputs(2, 21, 12, 6, True, True, True, True)
    y, final = selective_scan_triton(**kw, dt_softplus=True, chunk_size=8)
    y_ref, final_ref, ref_leaves = reference(kw, True)
    backward_one_output((y, final), (y_ref, final_ref), used, kw, ref_leaves, TOL)


@pytest.mark.parametrize(
    ("case", "chunks_per_segment"), [("D-z-bias-softplus-init", 1), ("chunk4-D-z-bias-softplus", 2)]
)
def test_sequence_segments(case, chunks_per_segment, monkeypatch):
    """Both directions split into segments, as for narrow batches on a GPU, each started from the carry of
    the segments before (forward) or after it (backward). The backward: 3 segments of 1 chunk (21 steps,
    chunk 8), or 3 of 2 chunks (23 steps, chunk 4); the forward, which walks 16 steps an iteration: 2 segments
    of one iteration each."""
    b, l, e, n, chunk, has_d, has_z, has_bias, softplus, has_init, dt_scale = CASES[case]
    segments = -(-l // chunk) // chunks_per_segment
    monkeypatch.setattr(kernels, "_backward_segments", lambda programs, n_chunks, device: segments)
    monkeypatch.setattr(kernels, "_forward_segments", lambda programs, n_chunks, device: n_chunks)
    kw = make_inputs(b, l, e, n, has_d, has_z, has_bias, has_init, dt_scale)
    check_against_reference(kw, softplus, chunk, TOL)


def packed_reference(kw, lengths, dt_softplus):
    """selective_scan_ref in float64 on each packed sequence alone, from its own initial state; returns
    (y (1, l, e), final (s, e, n), leaves)."""
    leaves = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in kw.items()}
    dt = prepare_dt_ref(leaves["dt"], leaves["dt_bias"], dt_softplus).double()
    ys, finals, start = [], [], 0
    for i, length in enumerate(lengths):
        part = slice(start, start + length)
        seq = [t[:, part] for t in (leaves["x"], dt)] + [leaves["A"]] + [t[:, part] for t in (leaves["B"], leaves["C"])]
        init = None if leaves["initial_state"] is None else leaves["initial_state"][i : i + 1]
        if length:
            y, final = selective_scan_ref(*seq, leaves["D"], leaves["z"][:, part], init)
            ys.append(y)
        else:  # an empty sequence ends where it starts
            final = init if init is not None else leaves["x"].new_zeros(1, *leaves["A"].shape)
        finals.append(final)
        start += length
    return torch.cat(ys, 1), torch.cat(finals), leaves


PACKED = {  # lengths (chunk 8: boundaries inside chunks, on a chunk start, a one-token and an empty sequence)
    "7-1-13-9": (7, 1, 13, 9),
    "8-16-0-5": (8, 16, 0, 5),
}


@pytest.mark.parametrize("has_init", [False, True], ids=["zero-start", "initial-states"])
@pytest.mark.parametrize("lengths", list(PACKED.values()), ids=list(PACKED))
def test_packed_sequences_match_separate_runs(lengths, has_init):
    """cu_seqlens: every sequence restarts from its own initial state, its final state comes out on its own,
    and every gradient (initial states' too) equals that of running the sequences one by one."""
    s, l = len(lengths), sum(lengths)
    kw = make_inputs(1, l, 12, 6, True, True, True, False)
    kw["initial_state"] = torch.randn(s, 12, 6, device=DEVICE).requires_grad_(True) if has_init else None
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
    y, final = selective_scan_triton(**kw, dt_softplus=True, cu_seqlens=cu_seqlens, chunk_size=8)
    assert final.shape == (s, 12, 6)
    assert_matches_reference(kw, (y, final), packed_reference(kw, lengths, True), TOL)


def test_bfloat16_inputs():
    kw = make_inputs(1, 13, 8, 4, True, True, True, True, dtype=torch.bfloat16)
    check_against_reference(kw, True, 8, TOL_BF16)


def test_final_state_gradient_alone():
    """Only the final state feeds the loss: the output gradient is absent (None) in the backward."""
    kw = make_inputs(1, 11, 4, 4, True, True, False, True)
    _, final = selective_scan_triton(**kw, chunk_size=8)
    _, final_ref, leaves = reference(kw, False)
    final.sum().backward()
    final_ref.sum().backward()
    for name in ("x", "dt", "A", "B", "initial_state"):
        assert_close(kw[name].grad, leaves[name].grad, TOL, f"d{name}")


def test_custom_ops_pass_opcheck():
    kw = make_inputs(1, 9, 4, 4, True, True, True, True)
    args = [kw[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")]
    torch.library.opcheck(selective_scan_fwd, (*args, None, True, 8, True))
    y, final, states = selective_scan_fwd(*args, None, True, 8, True)
    assert states.shape == (1, 2, 4, 4)  # the state before each of the 2 chunks, kept for the backward
    plain = [t.detach() for t in args]
    grads = (torch.randn_like(y), torch.randn_like(final), states.detach())
    torch.library.opcheck(selective_scan_bwd, (*grads, *plain, None, True, 8))
    packed = [*args[:-1], torch.randn(2, 4, 4, device=DEVICE, requires_grad=True)]
    cu_seqlens = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(selective_scan_fwd, (*packed, cu_seqlens, True, 8, True))
    y, final, states = selective_scan_fwd(*packed, cu_seqlens, True, 8, True)
    grads = (torch.randn_like(y), torch.randn_like(final), states.detach())
    torch.library.opcheck(selective_scan_bwd, (*grads, *[t.detach() for t in packed], cu_seqlens, True, 8))
    step = (plain[0][:, 0], plain[1][:, 0].abs(), plain[2], plain[3][:, 0], plain[4][:, 0])
    torch.library.opcheck(
        selective_scan_step, (*step, torch.randn(1, 4, 4, device=DEVICE), plain[5], plain[6][:, 0], None, False)
    )
    pool, slot = torch.randn(3, 4, 4, device=DEVICE), torch.tensor([2], device=DEVICE)
    torch.library.opcheck(selective_scan_step, (*step, pool, plain[5], plain[6][:, 0], slot, True))


@pytest.mark.parametrize("softplus", [False, True], ids=["dt", "softplus-dt"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["state-fp32", "state-bf16"])
def test_step_matches_the_torch_step(state_dtype, softplus):
    b, e, n = 3, 10, 6
    kw = {k: v.detach() for k, v in make_inputs(b, 4, e, n, True, True, softplus, False).items() if v is not None}
    state = torch.randn(b, e, n, device=DEVICE).to(state_dtype)
    expected_state = state.clone()
    for t in range(4):
        args = (kw["x"][:, t], kw["dt"][:, t], kw["A"], kw["B"][:, t], kw["C"][:, t])
        y = selective_scan_step_triton(*args, state, kw["D"], kw["z"][:, t], dt_softplus=softplus)
        y_ref = selective_scan_step_torch(*args, expected_state, kw["D"], kw["z"][:, t], dt_softplus=softplus)
        assert_close(y, y_ref, TOL if state_dtype == torch.float32 else TOL_BF16, f"y[{t}]")
        assert_close(state, expected_state, TOL if state_dtype == torch.float32 else TOL_BF16, f"state[{t}]")


def test_step_reads_row_strided_views():
    """x, dt, z, B and C as column slices of wider rows (each its own row stride), the way the layer slices the
    projections' outputs: read in place, no copies, the same result as on contiguous copies."""
    b, e, n = 3, 10, 6
    rows = {"x": 13, "dt": 17, "z": 2 * e, "B": 2 * n + 5, "C": 3 * n}
    views = {k: torch.randn(b, w, device=DEVICE)[:, w - (n if k in "BC" else e) :] for k, w in rows.items()}
    A, D = -torch.rand(e, n, device=DEVICE) - 0.5, torch.randn(e, device=DEVICE)
    state = torch.randn(b, e, n, device=DEVICE)
    expected_state = state.clone()
    args = [views[k] for k in ("x", "dt")] + [A] + [views[k] for k in ("B", "C")]
    y = selective_scan_step_triton(*args, state, D, views["z"], dt_softplus=True)
    copies = [t.contiguous() for t in args]
    y_ref = selective_scan_step_torch(*copies, expected_state, D, views["z"].contiguous(), dt_softplus=True)
    assert all(views[k].stride(0) == w for k, w in rows.items())
    assert_close(y, y_ref, TOL, "y")
    assert_close(state, expected_state, TOL, "state")


def test_bad_arguments_name_the_problem():
    kw = make_inputs(1, 8, 4, 4, False, False, False, False)
    with pytest.raises(ValueError, match="chunk_size=12"):
        selective_scan_triton(**kw, chunk_size=12)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_triton(**{**kw, "A": kw["A"][:3]})
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan_triton(**{**kw, "initial_state": torch.zeros(2, 4, 4, device=DEVICE)})
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="one per sequence"):
        selective_scan_triton(**{**kw, "initial_state": torch.zeros(1, 4, 4, device=DEVICE)}, cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        selective_scan_triton(**kw, cu_seqlens=cu_seqlens.long())
    two = make_inputs(2, 8, 4, 4, False, False, False, False)
    with pytest.raises(ValueError, match="batch size 1, got 2"):
        selective_scan_triton(**two, cu_seqlens=cu_seqlens)


def test_selective_ssm_takes_the_triton_kernels_under_the_triton_selection():
    layer = SelectiveSSM(d_model=4, d_state=4).to(DEVICE)
    randomise(layer)
    x = torch.randn(2, 9, 4, device=DEVICE)
    expected = layer(x)
    with backends.use("triton"), backends.record() as calls:
        y = layer(x)
    assert ("selective_scan", "triton") in calls
    assert_close(y, expected, TOL, "y")

    state, expected_state = layer.init_state(2), layer.init_state(2)
    with torch.no_grad():
        layer(x, state=expected_state)
        expected_step = layer(x[:, :1], state=expected_state)
        with backends.use("triton"), backends.record() as calls:
            layer(x, state=state)
            step = layer(x[:, :1], state=state)
    assert calls.count(("selective_scan", "triton")) == 1 and ("selective_scan_step", "triton") in calls
    assert_close(step, expected_step, TOL, "step")
    assert_close(state.ssm, expected_state.ssm, TOL, "state")


def test_backward_segments_fill_the_waves():
    """One segment where the programs fill whole waves or run many, more where the last wave would be mostly
    empty (the H200's 132 SMs x 8 resident programs = 1056 slots)."""

    class H200:
        type = "cuda"

    props = type("Props", (), {"multi_processor_count": 132})
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.cuda, "get_device_properties", lambda device: props)
        segments = lambda programs, chunks: kernels._backward_segments(programs, chunks, H200)  # noqa: E731
        assert segments(8 * 384, 128) == 1  # B8 E1536: 3072 programs, 2.9 waves
        assert segments(2 * 512, 512) == 1  # B2 E2048: 1024 programs, one wave
        assert segments(1 * 1280, 1024) > 8  # B1 E5120: 1280 programs, 1.2 waves
    assert kernels._backward_segments(1280, 1024, torch.device("cpu")) == 1
