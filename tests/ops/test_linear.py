"""The linear op: the C++ small-batch product for 2..16 rows without autograd, F.linear otherwise.

The kernel works on blocks of 4 weight rows and 4 input rows, and on vectors of 16 float32 (8 float64)
along k, so o, m and k below leave every kind of remainder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssmblocks.layers.linear import Linear
from ssmblocks.ops import linear


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 11, 16])
@pytest.mark.parametrize(("o", "k"), [(1, 1), (3, 5), (13, 16), (7, 33), (258, 100)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_float64_product(kernel, dtype, m, o, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + o * 10 + k)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((m, k), (o, k), (o,)))
    expected = x @ w.T + (b if bias else 0)
    got = kernel.small_batch_linear(x.to(dtype), w.to(dtype), b.to(dtype) if bias else None)
    assert got.shape == (m, o) and got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert (got.double() - expected).abs().max() <= tol * max(1.0, k**0.5 * expected.abs().max().item())


def test_linear_uses_the_kernel_only_for_small_batches_without_autograd(kernel_calls):
    layer = Linear(24, 10)
    for shape, runs in [((8, 24), True), ((2, 3, 24), True), ((1, 1, 24), False), ((17, 24), False)]:
        x, before = torch.randn(shape), len(kernel_calls)
        with torch.no_grad():
            got = layer(x)
        assert len(kernel_calls) - before == runs, shape
        assert got.shape == (*shape[:-1], 10)
        torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 2  # (2, 3) tokens flattened: 6 rows
    out = layer(torch.randn(8, 24))  # autograd on: F.linear, gradients flow
    out.sum().backward()
    assert layer.weight.grad is not None and len(kernel_calls) == 2


def test_linear_on_non_contiguous_input_and_float64(kernel_calls):
    layer = Linear(9, 5, dtype=torch.float64)
    x = torch.randn(4, 18, dtype=torch.float64)[:, ::2]  # stride 2 along features
    with torch.inference_mode():
        got = layer(x)
    assert kernel_calls and torch.allclose(got, F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-12)


def test_linear_leaves_other_dtypes_and_subclasses_to_torch(kernel_calls):
    layer = Linear(16, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(torch.randn(4, 16, dtype=torch.bfloat16))
        layer.weight = nn.Parameter(torch.randn(8, 16).as_subclass(SubTensor), requires_grad=False)
        layer.bias = None
        linear(torch.randn(4, 16), layer.weight)
    assert kernel_calls == []


class SubTensor(torch.Tensor):
    """Stands in for quantized or distributed weights (tensor subclasses)."""


def test_linear_module_is_an_nn_linear_with_its_keys():
    layer = Linear(6, 4, bias=False)
    assert isinstance(layer, nn.Linear) and list(layer.state_dict()) == ["weight"]


def test_kernel_errors_name_the_shapes(kernel):
    with pytest.raises(RuntimeError, match=r"x must be \(m, k\) and weight \(o, k\)"):
        kernel.small_batch_linear(torch.randn(2, 5), torch.randn(3, 4), None)
    with pytest.raises(RuntimeError, match=r"bias must be \(3,\)"):
        kernel.small_batch_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4))
