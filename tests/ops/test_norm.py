"""rms_norm and gated_rms_norm against plain float64 formulas, grouped and ungrouped, and their output dtypes;
add_rms_norm against the sum then rms_norm; each test on every backend present (the C++ kernel runs float32 and
float64 without autograd on the CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmblocks.ops import add_rms_norm, gated_rms_norm, rms_norm
from tests.helpers import assert_close

TOL = 1e-6  # the ops compute in float32 whatever the input dtype
TOL_BF16 = 1e-2  # bfloat16 outputs keep 8 significant bits

D = 24
GROUPS = {"ungrouped": None, "group_24_is_d": 24, "group_12": 12, "group_8": 8, "group_3": 3}
# eps matters when the mean square is small: scale the inputs down to make it count
SCALES_EPS = {"unit_eps1e-5": (1.0, 1e-5), "small_eps1e-5": (1e-3, 1e-5), "unit_eps0.1": (1.0, 0.1)}


@pytest.fixture(autouse=True)
def path(backend):
    """Every test on each backend of this machine."""
    return backend


def rms_formula(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight in float64, the mean taken over each group of group_size channels."""
    x = x.double()
    gs = x.shape[-1] if group_size is None else group_size
    xg = x.unflatten(-1, (-1, gs))
    y = xg / torch.sqrt((xg**2).mean(-1, keepdim=True) + eps)
    return y.flatten(-2) * weight.double()


def gated_formula(x, z, weight, eps, group_size, norm_before_gate):
    gate = F.silu(z.double())
    if norm_before_gate:
        return rms_formula(x, weight, eps, group_size) * gate
    return rms_formula(x.double() * gate, weight, eps, group_size)


def norm_inputs(scale: float, dtype: torch.dtype = torch.float32):
    x = (torch.randn(2, 5, D, dtype=torch.float64) * scale).to(dtype)
    z = torch.randn(2, 5, D, dtype=torch.float64).to(dtype)
    weight = (1 + 0.5 * torch.randn(D, dtype=torch.float64)).to(dtype)
    return x, z, weight


@pytest.mark.parametrize("scale, eps", SCALES_EPS.values(), ids=SCALES_EPS.keys())
@pytest.mark.parametrize("group_size", GROUPS.values(), ids=GROUPS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_rms_norm_matches_formula(dtype, group_size, scale, eps):
    x, _, weight = norm_inputs(scale, dtype)
    y = rms_norm(x, weight, eps, group_size)
    assert y.dtype == dtype
    assert_close(y, rms_formula(x, weight, eps, group_size), TOL, "y")


@pytest.mark.parametrize("group_size", [12, 8, 3], ids=["group_12", "group_8", "group_3"])
def test_grouped_rms_norm_is_per_group_rms_norm(group_size):
    """Grouping normalises each slice of group_size channels on its own, with its slice of the weight."""
    x, _, weight = norm_inputs(1.0)
    x[..., :group_size] *= 100.0  # groups of very different scales: a shared mean square would show
    grouped = rms_norm(x, weight, 1e-5, group_size)
    slices = [slice(s, s + group_size) for s in range(0, D, group_size)]
    pieces = torch.cat([rms_norm(x[..., s], weight[s], 1e-5) for s in slices], dim=-1)
    assert_close(grouped, pieces, TOL, "grouped vs rms_norm per group")
    manual = torch.cat([rms_formula(x[..., s], weight[s], 1e-5) for s in slices], dim=-1)
    assert_close(grouped, manual, TOL, "grouped vs float64 formula per group")


@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate_then_norm", "norm_then_gate"])
@pytest.mark.parametrize("scale, eps", SCALES_EPS.values(), ids=SCALES_EPS.keys())
@pytest.mark.parametrize("group_size", GROUPS.values(), ids=GROUPS.keys())
def test_gated_rms_norm_matches_formula(group_size, scale, eps, norm_before_gate):
    x, z, weight = norm_inputs(scale)
    y = gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate=norm_before_gate)
    assert y.dtype == torch.float32
    assert_close(y, gated_formula(x, z, weight, eps, group_size, norm_before_gate), TOL, "y")


def test_gated_rms_norm_default_gates_before_the_norm():
    x, z, weight = norm_inputs(1.0)
    expected = gated_formula(x, z, weight, 1e-5, None, norm_before_gate=False)
    assert_close(gated_rms_norm(x, z, weight, 1e-5), expected, TOL, "default norm_before_gate=False")


@pytest.mark.parametrize("group_size", [None, 8], ids=["ungrouped", "group_8"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16_weight", "fp32_weight"])
def test_bfloat16_input_gives_bfloat16_output(weight_dtype, group_size):
    x, z, weight = norm_inputs(1.0, torch.bfloat16)
    weight = weight.to(weight_dtype)
    y = rms_norm(x, weight, 1e-5, group_size)
    assert y.dtype == torch.bfloat16
    assert_close(y, rms_formula(x, weight, 1e-5, group_size), TOL_BF16, "rms_norm")
    for norm_before_gate in (False, True):
        y = gated_rms_norm(x, z, weight, 1e-5, group_size, norm_before_gate=norm_before_gate)
        assert y.dtype == torch.bfloat16
        expected = gated_formula(x, z, weight, 1e-5, group_size, norm_before_gate)
        assert_close(y, expected, TOL_BF16, f"gated_rms_norm norm_before_gate={norm_before_gate}")


def test_zero_input_gives_zero_output():
    x, z, weight = norm_inputs(0.0)
    assert torch.equal(rms_norm(x, weight, 1e-5), torch.zeros_like(x))
    assert torch.equal(gated_rms_norm(x, z, weight, 1e-5, 8), torch.zeros_like(x))


ADD_DTYPES = {  # x (the branch output), residual (the stream)
    "fp32": (torch.float32, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "bf16-x-fp32-residual": (torch.bfloat16, torch.float32),
    "fp32-x-bf16-residual": (torch.float32, torch.bfloat16),
    "bf16": (torch.bfloat16, torch.bfloat16),
}


def add_inputs(x_dtype, res_dtype, scale=1.0, requires_grad=False):
    """x, residual (both of size ``scale``) and weight (x's dtype, as a model's parameters)."""
    x, residual = (torch.randn(2, 5, D, dtype=torch.float64) * scale for _ in range(2))
    weight = 1 + 0.5 * torch.randn(D, dtype=torch.float64)
    pairs = ((x, x_dtype), (residual, res_dtype), (weight, x_dtype))
    return [t.to(dtype).requires_grad_(requires_grad) for t, dtype in pairs]


@pytest.mark.parametrize("scale, eps", SCALES_EPS.values(), ids=SCALES_EPS.keys())
@pytest.mark.parametrize("x_dtype, res_dtype", ADD_DTYPES.values(), ids=ADD_DTYPES.keys())
def test_add_rms_norm_is_the_sum_then_rms_norm(path, x_dtype, res_dtype, scale, eps):
    """summed = residual + x in the stream's dtype; y = rms_norm(summed) in x's dtype."""
    x, residual, weight = add_inputs(x_dtype, res_dtype, scale)
    y, summed = add_rms_norm(x, residual, weight, eps)
    assert (y.dtype, summed.dtype) == (x_dtype, res_dtype)
    tol = TOL_BF16 if torch.bfloat16 in (x_dtype, res_dtype) else TOL
    # Triton's interpreter (the triton path on a CPU) truncates to bfloat16 where torch and CUDA round to nearest
    exact = path != "triton" or res_dtype != torch.bfloat16
    assert_close(summed, residual + x.to(res_dtype), 0.0 if exact else TOL_BF16, "summed")
    assert_close(y, rms_formula(summed, weight, eps).to(x_dtype), tol, "y vs the float64 formula")
    assert_close(y, rms_norm(summed, weight, eps).to(x_dtype), tol, "y vs rms_norm of the sum")


@pytest.mark.parametrize("x_dtype, res_dtype", ADD_DTYPES.values(), ids=ADD_DTYPES.keys())
def test_add_rms_norm_gradients_are_the_compositions(x_dtype, res_dtype):
    """The gradients of x, residual and weight, from y and from the stream, are those of the two-step form."""
    leaves = add_inputs(x_dtype, res_dtype, requires_grad=True)
    twins = [t.detach().clone().requires_grad_(True) for t in leaves]
    y, summed = add_rms_norm(*leaves, 1e-5)
    summed_twin = twins[1] + twins[0].to(res_dtype)
    y_twin = rms_norm(summed_twin, twins[2], 1e-5).to(x_dtype)
    dy, dsummed = torch.randn_like(y), torch.randn_like(summed)
    torch.autograd.backward((y, summed), (dy, dsummed))
    torch.autograd.backward((y_twin, summed_twin), (dy, dsummed))
    tol = TOL_BF16 if torch.bfloat16 in (x_dtype, res_dtype) else TOL
    for name, leaf, twin in zip(("dx", "dresidual", "dweight"), leaves, twins, strict=True):
        assert leaf.grad.dtype == leaf.dtype
        assert_close(leaf.grad, twin.grad, tol, name)


def test_add_rms_norm_names_a_residual_of_another_shape():
    x, residual, weight = norm_inputs(1.0)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(2, 5, 24\), got \(5, 24\)"):
        add_rms_norm(x, residual[0], weight, 1e-5)
