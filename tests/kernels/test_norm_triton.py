"""The Triton RMS norms (kernels/norm.py) against rms_norm_torch, gated_rms_norm_torch and add_rms_norm_torch in
float64: forward and every gradient, grouped, gated both ways, a residual stream of its own dtype, on strided
inputs and row counts that leave a partial block of rows.

On a machine without CUDA the kernels run in Triton's interpreter (conftest.py), so shapes stay tiny.
"""

import pytest
import torch

from ssmblocks.ops.norm import add_rms_norm_torch, gated_rms_norm_torch, rms_norm_torch
from tests.helpers import assert_close

pytest.importorskip("triton")
from ssmblocks.kernels import norm as norm_kernels  # noqa: E402
from ssmblocks.kernels.norm import (  # noqa: E402
    MAX_GROUP,
    add_rms_norm_bwd,
    add_rms_norm_fwd,
    add_rms_norm_triton,
    gated_rms_norm_triton,
    rms_norm_bwd,
    rms_norm_fwd,
    rms_norm_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
EPS = 1e-5

CASES = {
    # name: (leading dims, d, group_size, gate, layout, scale). gate: None (no z), "gate-norm" (norm(x * silu(z)),
    # norm_before_gate=False) or "norm-gate"; layout of x and z: "contiguous", "sliced" (rows d + 5 apart) or
    # "transposed" (channel stride != 1). The kernels take 16 rows a block: 7 and 21 rows leave a partial block,
    # 35 rows make a backward program (2 on the CPU) visit two blocks. scale 1e-3: eps matters.
    "7rows": ((7,), 32, None, None, "contiguous", 1.0),
    "21rows-3groups-of-24-gate-norm": ((3, 7), 72, 24, "gate-norm", "contiguous", 1.0),
    "21rows-3groups-of-24-norm-gate": ((3, 7), 72, 24, "norm-gate", "contiguous", 1.0),
    "35rows-d40-sliced-gate-norm": ((5, 7), 40, None, "gate-norm", "sliced", 1.0),
    "10rows-2groups-of-8-sliced-norm-gate-small": ((2, 5), 16, 8, "norm-gate", "sliced", 1e-3),
    "9rows-transposed-small": ((9,), 24, None, None, "transposed", 1e-3),
    "7rows-2groups-of-12-transposed-gate-norm": ((7,), 24, 12, "gate-norm", "transposed", 1.0),
}


def leaf(lead, d, layout, scale, dtype):
    """A leaf whose ``laid_out`` view is (*lead, d) in ``layout``."""
    shape = {"contiguous": (*lead, d), "sliced": (*lead, d + 5), "transposed": (d, *lead)}[layout]
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_(True)


def laid_out(t, d, layout):
    return {"contiguous": t, "sliced": t[..., 2 : 2 + d], "transposed": t.movedim(0, -1)}[layout]


def make_leaves(lead, d, gate, layout, scale, dtype=torch.float32, weight_dtype=None):
    return dict(
        x=leaf(lead, d, layout, scale, dtype),
        z=None if gate is None else leaf(lead, d, layout, 1.0, dtype),
        weight=(1 + 0.5 * torch.randn(d, device=DEVICE)).to(weight_dtype or dtype).requires_grad_(True),
    )


def as_float64(leaves):
    return {n: None if t is None else t.detach().double().requires_grad_(True) for n, t in leaves.items()}


def run(leaves, d, group_size, gate, layout, triton):
    x = laid_out(leaves["x"], d, layout)
    if gate is None:
        return (rms_norm_triton if triton else rms_norm_torch)(x, leaves["weight"], EPS, group_size)
    z = laid_out(leaves["z"], d, layout)
    norm = gated_rms_norm_triton if triton else gated_rms_norm_torch
    return norm(x, z, leaves["weight"], EPS, group_size, norm_before_gate=gate == "norm-gate")


def check(lead, d, group_size, gate, layout, scale, dtype=torch.float32, weight_dtype=None):
    """Forward and the gradients of every leaf against the float64 torch reference."""
    leaves = make_leaves(lead, d, gate, layout, scale, dtype, weight_dtype)
    ref_leaves = as_float64(leaves)
    y = run(leaves, d, group_size, gate, layout, triton=True)
    y_ref = run(ref_leaves, d, group_size, gate, layout, triton=False)
    assert y.dtype == dtype and y.shape == (*lead, d)
    assert_close(y, y_ref, TOL[dtype], "y")
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    for name, t in leaves.items():
        if t is not None:
            assert t.grad.dtype == t.dtype
            assert_close(t.grad, ref_leaves[name].grad, TOL[dtype], f"d{name}")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_and_gradients(case):
    check(*CASES[case])


@pytest.mark.parametrize("gate", [None, "gate-norm", "norm-gate"], ids=["ungated", "gate-norm", "norm-gate"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16-weight", "fp32-weight"])
def test_bfloat16(weight_dtype, gate):
    check((3, 7), 48, 24, gate, "sliced", 1.0, torch.bfloat16, weight_dtype)


@pytest.mark.parametrize(
    "weight, z, group_size, message",
    [
        (torch.ones(25), None, None, r"weight must be \(d,\) = \(24,\), got \(25,\)"),
        (torch.ones(24), torch.ones(3, 23), None, r"z must have x's shape \(3, 24\), got \(3, 23\)"),
        (torch.ones(24), None, 5, "group_size=5 must divide d=24"),
        (torch.ones(24), torch.ones(3, 24), -24, "group_size=-24 must divide d=24"),
    ],
    ids=["weight", "z", "group-not-dividing", "group-negative"],
)
def test_bad_arguments_name_the_problem(weight, z, group_size, message):
    with pytest.raises(ValueError, match=message):
        if z is None:
            rms_norm_triton(torch.ones(3, 24), weight, EPS, group_size)
        else:
            gated_rms_norm_triton(torch.ones(3, 24), z, weight, EPS, group_size)


def test_a_group_over_the_limit_is_refused():
    d = 2 * MAX_GROUP
    with pytest.raises(ValueError, match=f"group_size={d} must divide d={d} and be at most {MAX_GROUP}"):
        rms_norm_triton(torch.ones(1, d), torch.ones(d), EPS)


@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
def test_custom_ops_pass_opcheck(gated):
    x = torch.randn(7, 24, device=DEVICE, requires_grad=True)
    z = torch.randn(7, 24, device=DEVICE, requires_grad=True) if gated else None
    weight = torch.randn(24, device=DEVICE, requires_grad=True)
    torch.library.opcheck(rms_norm_fwd, (x, z, weight, EPS, 12, gated))
    y, rstd = rms_norm_fwd(x, z, weight, EPS, 12, gated)
    assert rstd.shape == (7, 2) and rstd.dtype == torch.float32
    plain = [None if t is None else t.detach() for t in (x, z, weight)]
    torch.library.opcheck(rms_norm_bwd, (torch.randn_like(y), *plain, rstd.detach(), 12, gated))


F32, BF16 = torch.float32, torch.bfloat16
ADD_CASES = {
    # name: (leading dims, d, dtypes of x, residual and weight, layouts of x and residual (as CASES), scale)
    "7rows-fp32": ((7,), 32, (F32, F32, F32), ("contiguous", "contiguous"), 1.0),
    "21rows-d40-bf16-x-fp32-residual": ((3, 7), 40, (BF16, F32, BF16), ("contiguous", "contiguous"), 1.0),
    "35rows-d72-bf16-x-sliced-fp32-residual": ((5, 7), 72, (BF16, F32, F32), ("contiguous", "sliced"), 1.0),
    "10rows-d24-sliced-fp32-small": ((2, 5), 24, (F32, F32, F32), ("sliced", "contiguous"), 1e-3),
    "9rows-d24-transposed-fp32": ((9,), 24, (F32, F32, F32), ("transposed", "transposed"), 1.0),
    "10rows-d48-sliced-bf16": ((2, 5), 48, (BF16, BF16, BF16), ("sliced", "sliced"), 1.0),
    "7rows-fp32-x-bf16-residual": ((7,), 32, (F32, BF16, F32), ("contiguous", "contiguous"), 1.0),
}


def add_tol(t, residual_dtype):
    """bfloat16's tolerance for a bfloat16 result, and for every result when summed (the normed input) is one."""
    return TOL[BF16 if BF16 in (t.dtype, residual_dtype) else F32]


@pytest.mark.parametrize("loss", ["y", "summed", "y-and-summed"])
@pytest.mark.parametrize("case", list(ADD_CASES), ids=list(ADD_CASES))
def test_add_rms_norm_forward_and_gradients(case, loss):
    """Forward, and the gradients of x, residual and weight from y alone, from the residual stream alone, or from
    both."""
    lead, d, (x_dtype, res_dtype, w_dtype), (x_layout, res_layout), scale = ADD_CASES[case]
    leaves = dict(
        x=leaf(lead, d, x_layout, scale, x_dtype),
        residual=leaf(lead, d, res_layout, scale, res_dtype),
        weight=(1 + 0.5 * torch.randn(d, device=DEVICE)).to(w_dtype).requires_grad_(True),
    )
    ref_leaves = as_float64(leaves)
    x, residual = laid_out(leaves["x"], d, x_layout), laid_out(leaves["residual"], d, res_layout)
    y, summed = add_rms_norm_triton(x, residual, leaves["weight"], EPS)
    ref_x, ref_residual = laid_out(ref_leaves["x"], d, x_layout), laid_out(ref_leaves["residual"], d, res_layout)
    y_ref, summed_ref = add_rms_norm_torch(ref_x, ref_residual, ref_leaves["weight"], EPS)
    assert (y.dtype, summed.dtype) == (x_dtype, res_dtype) and y.shape == summed.shape == (*lead, d)
    if res_dtype == F32 or DEVICE == "cuda":  # the very sum torch computes (the interpreter truncates to bf16)
        assert torch.equal(summed, residual + x.to(res_dtype))
    assert_close(summed, summed_ref, add_tol(summed, res_dtype), "summed")
    assert_close(y, y_ref, add_tol(y, res_dtype), "y")
    y_of_summed = rms_norm_torch(summed.double(), leaves["weight"].double(), EPS)
    assert_close(y, y_of_summed, TOL[x_dtype], "y vs the norm of summed as stored")  # summed rounded, then normed

    dy = torch.randn_like(y) if loss != "summed" else torch.zeros_like(y)  # in y's dtype, as the reference sees it
    dsummed = torch.randn_like(summed) if loss != "y" else torch.zeros_like(summed)
    if loss == "y":
        y.backward(dy)
    elif loss == "summed":
        summed.backward(dsummed)
    else:
        torch.autograd.backward((y, summed), (dy, dsummed))
    torch.autograd.backward((y_ref, summed_ref), (dy.double(), dsummed.double()))
    for name, t in leaves.items():
        assert t.grad.dtype == t.dtype
        assert_close(t.grad, ref_leaves[name].grad, add_tol(t.grad, res_dtype), f"d{name}")


def test_a_loss_of_y_alone_hands_the_backward_no_dsummed(monkeypatch):
    """No zeros the size of the residual stream are made for the output nobody used."""
    seen = []
    original = norm_kernels.add_rms_norm_bwd

    def spy(dy, dsummed, *rest):
        seen.append(dsummed)
        return original(dy, dsummed, *rest)

    monkeypatch.setattr(norm_kernels, "add_rms_norm_bwd", spy)
    x, residual = (torch.randn(5, 24, device=DEVICE, requires_grad=True) for _ in range(2))
    y, _ = add_rms_norm_triton(x, residual, torch.ones(24, device=DEVICE), EPS)
    y.sum().backward()
    assert seen == [None]
    assert_close(residual.grad, x.grad, 0.0, "dresidual = dx")


def test_add_rms_norm_bwd_without_dsummed_is_with_zeros():
    """No dsummed (a loss of y alone: autograd hands the backward None) is the same as zeros."""
    x = torch.randn(21, 40, device=DEVICE).bfloat16()
    residual, weight = torch.randn(21, 40, device=DEVICE), torch.randn(40, device=DEVICE)
    y, summed, rstd = add_rms_norm_fwd(x, residual, weight, EPS)
    dy = torch.randn_like(y)
    without = add_rms_norm_bwd(dy, None, summed, weight, rstd)
    with_zeros = add_rms_norm_bwd(dy, torch.zeros_like(summed), summed, weight, rstd)
    for a, b in zip(without, with_zeros, strict=True):
        assert torch.equal(a, b)
    assert [t.dtype for t in without] == [BF16, F32, F32]


def test_add_rms_norm_custom_ops_pass_opcheck():
    x = torch.randn(7, 24, device=DEVICE).bfloat16().requires_grad_(True)
    residual = torch.randn(7, 24, device=DEVICE, requires_grad=True)
    weight = torch.randn(24, device=DEVICE, requires_grad=True)
    torch.library.opcheck(add_rms_norm_fwd, (x, residual, weight, EPS))
    y, summed, rstd = add_rms_norm_fwd(x, residual, weight, EPS)
    assert rstd.shape == (7, 1) and rstd.dtype == F32
    plain = [t.detach() for t in (summed, weight, rstd)]
    dy = torch.randn_like(y)
    for dsummed in (None, torch.randn_like(plain[0])):
        torch.library.opcheck(add_rms_norm_bwd, (dy, dsummed, *plain))


@pytest.mark.parametrize(
    "residual, weight, message",
    [
        (torch.ones(3, 23), torch.ones(24), r"residual must have x's shape \(3, 24\), got \(3, 23\)"),
        (torch.ones(3, 24), torch.ones(3, 24), r"weight must be \(d,\) = \(24,\), got \(3, 24\)"),
    ],
    ids=["residual", "weight"],
)
def test_add_rms_norm_bad_arguments_name_the_problem(residual, weight, message):
    with pytest.raises(ValueError, match=message):
        add_rms_norm_triton(torch.ones(3, 24), residual, weight, EPS)
