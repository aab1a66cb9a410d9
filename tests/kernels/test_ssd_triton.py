"""The Triton SSD scan (kernels/ssd.py) against ssd_ref in float64: forward, final states and every gradient.

On a machine without CUDA the kernels run in Triton's interpreter (conftest.py), so shapes stay tiny.
"""

import subprocess
import sys

import pytest
import torch

from ssmblocks.ops.ssd import ssd_ref
from tests.helpers import assert_close, backward_one_output

pytest.importorskip("triton")
from ssmblocks.kernels import ssd as ssd_kernels  # noqa: E402
from ssmblocks.kernels.ssd import CHUNK_SIZES, prepare_dt_ref, ssd_chunked_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4  # float32 kernels against a float64 reference

CASES = {
    # name: (b, l, h, p, g, n, chunk, D shape, z, dt_bias, softplus, dt_limit, initial state)
    "plain": (2, 21, 2, 16, 1, 16, 16, "h", False, False, False, (0.0, float("inf")), False),
    "groups-Dhp-z-bias-softplus-limits-init": (2, 37, 4, 16, 2, 16, 16, "hp", True, True, True, (0.05, 0.8), True),
    "chunk32-n-p-not-pow2-noD": (1, 45, 2, 24, 1, 40, 32, None, True, True, True, (0.0, float("inf")), True),
    # a group per head: each head has its own B and C
    "group-per-head": (1, 30, 2, 16, 2, 16, 16, "h", True, True, True, (0.0, float("inf")), False),
}


def make_inputs(b, l, h, p, g, n, d_shape, has_z, has_bias, has_init, seqs=None):
    """Random float32 leaves on DEVICE, in ssd_chunked_triton's argument names."""
    kw = dict(
        x=torch.randn(b, l, h, p),
        dt=torch.randn(b, l, h) * 0.5 + (0.0 if has_bias else 1.0),  # softplus-free cases need dt > 0 mostly
        A=-torch.rand(h) - 0.5,
        B=torch.randn(b, l, g, n),
        C=torch.randn(b, l, g, n),
        D={"h": torch.randn(h), "hp": torch.randn(h, p), None: None}[d_shape],
        z=torch.randn(b, l, h, p) if has_z else None,
        dt_bias=torch.randn(h) * 0.3 if has_bias else None,
        initial_state=torch.randn(seqs or b, h, p, n) if has_init else None,
    )
    return {k: None if v is None else v.to(DEVICE).requires_grad_(True) for k, v in kw.items()}


def reference(kw, dt_softplus, dt_limit):
    """ssd_ref in float64 on float64 copies of kw's leaves; returns (y, final, leaves)."""
    leaves = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in kw.items()}
    dt = prepare_dt_ref(leaves["dt"], leaves["dt_bias"], dt_softplus, dt_limit).double()
    args = (leaves["x"], dt, leaves["A"], leaves["B"], leaves["C"], leaves["D"], leaves["z"])
    y, final = ssd_ref(*args, leaves["initial_state"])
    return y, final, leaves


def check_grads(kw, ref_leaves):
    for name, leaf in kw.items():
        if leaf is not None:
            assert_close(leaf.grad, ref_leaves[name].grad, TOL, f"d{name}")


def check_against_reference(kw, softplus, dt_limit, chunk):
    """The kernels' y, final state and every gradient against the float64 reference."""
    y, final = ssd_chunked_triton(**kw, dt_softplus=softplus, dt_limit=dt_limit, chunk_size=chunk)
    y_ref, final_ref, ref_leaves = reference(kw, softplus, dt_limit)
    assert y.dtype == kw["x"].dtype and final.dtype == torch.float32
    assert_close(y, y_ref, TOL, "y")
    assert_close(final, final_ref, TOL, "final_state")

    dy, dfinal = torch.randn_like(y_ref), torch.randn_like(final_ref)
    torch.autograd.backward((y, final), (dy.to(y), dfinal.to(final)))
    torch.autograd.backward((y_ref, final_ref), (dy, dfinal))
    check_grads(kw, ref_leaves)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_and_gradients(case):
    b, l, h, p, g, n, chunk, d_shape, has_z, has_bias, softplus, dt_limit, has_init = CASES[case]
    kw = make_inputs(b, l, h, p, g, n, d_shape, has_z, has_bias, has_init)
    check_against_reference(kw, softplus, dt_limit, chunk)


@pytest.mark.parametrize("sm_count", [0, 10**6], ids=["one-wide-state-tile", "two-state-tiles"])
def test_state_passes_over_one_or_several_state_tiles(sm_count, monkeypatch):
    """d_state 80: the state passes take it as one 128-wide tile where the GPU has programs enough for that, else
    as two 64-wide tiles (whose second is part masked)."""
    monkeypatch.setattr(ssd_kernels, "sm_count", lambda device: sm_count)
    kw = make_inputs(1, 37, 2, 16, 1, 80, "h", True, True, True)
    check_against_reference(kw, True, (0.0, float("inf")), 16)


@pytest.mark.parametrize("used", [0, 1], ids=["y", "final_state"])
def test_one_output_used(used):
    """A loss of y alone or of the final state alone (which depends on neither C, D nor z): the other output's
    gradient is None, not zeros."""
    kw = make_inputs(2, 37, 4, 16, 2, 16, "hp", True, True, True)
    y, final = ssd_chunked_triton(**kw, dt_softplus=True, chunk_size=16)
    y_ref, final_ref, ref_leaves = reference(kw, True, (0.0, float("inf")))
    backward_one_output((y, final), (y_ref, final_ref), used, kw, ref_leaves, TOL)


def test_packed_sequences_match_separate_runs():
    """Lengths 5, 17 (over a chunk), 1 and 18 packed in one row: no state crosses a boundary."""
    lengths, h, p, g, n = [5, 17, 1, 18], 2, 16, 1, 16
    cu_seqlens = torch.tensor([0, 5, 22, 23, 41], dtype=torch.int32, device=DEVICE)
    kw = make_inputs(1, sum(lengths), h, p, g, n, "h", True, True, False)
    y, final = ssd_chunked_triton(**kw, dt_softplus=True, cu_seqlens=cu_seqlens, chunk_size=16)
    assert final.shape == (len(lengths), h, p, n)

    leaves = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in kw.items()}
    dt = prepare_dt_ref(leaves["dt"], leaves["dt_bias"], True).double()
    ys, finals = [], []
    for s0, s1 in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        part = (leaves["x"], dt, None, leaves["B"], leaves["C"], None, leaves["z"])
        part = [t if t is None else t[:, s0:s1] for t in part]
        y_s, final_s = ssd_ref(part[0], part[1], leaves["A"], part[3], part[4], leaves["D"], part[6])
        ys.append(y_s)
        finals.append(final_s)
    y_ref, final_ref = torch.cat(ys, 1), torch.cat(finals, 0)
    assert_close(y, y_ref, TOL, "y")
    assert_close(final, final_ref, TOL, "final_state")

    dy, dfinal = torch.randn_like(y_ref), torch.randn_like(final_ref)
    torch.autograd.backward((y, final), (dy.to(y), dfinal.to(final)))
    torch.autograd.backward((y_ref, final_ref), (dy, dfinal))
    check_grads(kw, leaves)


def test_compiles_without_graph_breaks():
    kw = make_inputs(1, 19, 2, 16, 1, 16, "h", True, True, True)

    def loss(kw):
        y, final = ssd_chunked_triton(**kw, dt_softplus=True, chunk_size=16)
        return y.square().sum() + final.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(kw), [kw["x"], kw["dt_bias"]])
    expected = torch.autograd.grad(loss(kw), [kw["x"], kw["dt_bias"]])
    for got, want in zip(grads, expected, strict=True):
        assert_close(got, want, 1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(chunk_size=48), "chunk_size=48"),
        (dict(A=torch.ones(3)), "A must be"),
        (dict(B=torch.ones(1, 8, 3, 16), C=torch.ones(1, 8, 3, 16)), "split evenly"),
        (dict(D=torch.ones(2, 5)), "D must be"),
        (dict(cu_seqlens=torch.tensor([0, 8])), "int32"),
        (dict(initial_state=torch.ones(2, 2, 16, 16)), "initial_state must be"),
    ],
    ids=["chunk", "A", "groups", "D", "cu_seqlens", "initial_state"],
)
def test_bad_arguments_name_the_problem(change, message):
    kw = dict(
        x=torch.ones(1, 8, 2, 16), dt=torch.ones(1, 8, 2), A=torch.ones(2),
        B=torch.ones(1, 8, 1, 16), C=torch.ones(1, 8, 1, 16),
    )  # fmt: skip
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        ssd_chunked_triton(**kw)


def test_chunk_sizes_are_powers_of_two():
    assert all(c & (c - 1) == 0 and c >= 16 for c in CHUNK_SIZES)


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; import ssmblocks, ssmblocks.kernels as k; assert not k.available()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
