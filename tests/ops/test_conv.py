"""causal_conv1d and causal_conv1d_step against causal_conv1d_ref, and the carried conv_state: one call == chunks
== token by token.

Shapes as in ssmblocks.ops.conv: x: (b, l, c); weight: (c, 1, k); bias: (c,); conv_state: (b, c, k - 1).
"""

from __future__ import annotations

import pytest
import torch

from ssmblocks import backends
from ssmblocks.ops import causal_conv1d, causal_conv1d_ref, causal_conv1d_step
from tests.helpers import assert_close

TOL64 = 1e-12
TOL32 = 1e-6

LENGTHS = {"l1": 1, "l3_lt_k": 3, "l10": 10}
WIDTHS = {"k2": 2, "k4": 4}
ACTIVATIONS = {"linear": None, "silu": "silu"}
BIASES = {"bias": True, "no_bias": False}
# chunkings of a 11-token sequence, with pieces shorter than k - 1 so the state must mix old and new inputs
SPLITS = {"one_call": [11], "4_7": [4, 7], "3_1_5_2": [3, 1, 5, 2], "token_by_token": [1] * 11}


def conv_inputs(b: int, l: int, c: int, k: int, bias: bool, dtype: torch.dtype = torch.float64):
    x = torch.randn(b, l, c, dtype=dtype)
    weight = torch.randn(c, 1, k, dtype=dtype)
    return x, weight, torch.randn(c, dtype=dtype) if bias else None


@pytest.mark.parametrize("activation", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
@pytest.mark.parametrize("bias", BIASES.values(), ids=BIASES.keys())
@pytest.mark.parametrize("k", WIDTHS.values(), ids=WIDTHS.keys())
@pytest.mark.parametrize("l", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_matches_reference(dtype, l, k, bias, activation):
    x, weight, b = conv_inputs(2, l, 5, k, bias, dtype)
    expected = causal_conv1d_ref(x.double(), weight.double(), None if b is None else b.double(), activation)
    y = causal_conv1d(x, weight, b, activation)
    assert y.dtype == dtype
    assert_close(y, expected, TOL64 if dtype == torch.float64 else TOL32, "y")


def test_reference_is_causal_and_matches_formula():
    """y[t] = bias + sum_j w[j] x[t - (k - 1) + j]: check the reference itself on a hand-computed case."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1)
    weight = torch.tensor([10.0, 100.0, 1000.0], dtype=torch.float64).view(1, 1, 3)
    bias = torch.tensor([0.5], dtype=torch.float64)
    expected = torch.tensor([1000.5, 2100.5, 3210.5, 4320.5], dtype=torch.float64).view(1, 4, 1)
    assert_close(causal_conv1d_ref(x, weight, bias), expected, TOL64, "reference")
    assert_close(causal_conv1d(x, weight, bias), expected, TOL64, "fast path")


@pytest.mark.parametrize("bias", BIASES.values(), ids=BIASES.keys())
def test_gradients_match_reference(bias):
    x, weight, b = conv_inputs(2, 7, 3, 4, bias)
    inputs = {name: t.requires_grad_() for name, t in (("x", x), ("weight", weight), ("bias", b)) if t is not None}
    gy = torch.randn(2, 7, 3, dtype=torch.float64)
    expected = torch.autograd.grad((causal_conv1d_ref(x, weight, b, "silu") * gy).sum(), list(inputs.values()))
    actual = torch.autograd.grad((causal_conv1d(x, weight, b, "silu") * gy).sum(), list(inputs.values()))
    for name, a, e in zip(inputs, actual, expected, strict=True):
        assert_close(a, e, TOL64, f"grad {name}")


# ---------------------------------------------------------------------------------------------- conv_state


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize("activation", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
@pytest.mark.parametrize("bias", BIASES.values(), ids=BIASES.keys())
@pytest.mark.parametrize("k", WIDTHS.values(), ids=WIDTHS.keys())
def test_chunked_calls_with_state_match_one_call(k, bias, activation, split):
    """Starting from a non-zero state (the k - 1 inputs before x), any chunking gives the reference outputs of the
    whole history, and the state ends as the last k - 1 inputs, updated in place."""
    x, weight, b = conv_inputs(2, sum(split), 5, k, bias)
    past = torch.randn(2, k - 1, 5, dtype=torch.float64)
    expected = causal_conv1d_ref(torch.cat([past, x], dim=1), weight, b, activation)[:, k - 1 :]
    state = past.transpose(1, 2).contiguous()  # (b, c, k - 1)
    buffer = state.data_ptr()
    ys, start = [], 0
    for size in split:
        ys.append(causal_conv1d(x[:, start : start + size], weight, b, activation, conv_state=state))
        start += size
    assert_close(torch.cat(ys, dim=1), expected, TOL64, "y")
    assert state.data_ptr() == buffer, "conv_state must be updated in place"
    assert torch.equal(state, torch.cat([past, x], dim=1)[:, -(k - 1) :].transpose(1, 2)), "conv_state"


@pytest.mark.parametrize("k", WIDTHS.values(), ids=WIDTHS.keys())
def test_zero_state_equals_no_state(k):
    x, weight, b = conv_inputs(2, 6, 3, k, True)
    state = torch.zeros(2, 3, k - 1, dtype=torch.float64)
    assert_close(causal_conv1d(x, weight, b, "silu", conv_state=state), causal_conv1d_ref(x, weight, b, "silu"), TOL64)


@pytest.mark.parametrize("l", [1, 2, 6], ids=["l1", "l2_lt_k", "l6"])
def test_float32_state_with_bfloat16_input(l):
    """A float32 state buffer keeps working (and stays float32) when fed lower-precision inputs."""
    x, weight, b = conv_inputs(2, l, 3, 4, True, torch.bfloat16)
    past = torch.randn(2, 3, 3).to(torch.bfloat16).float()  # earlier bfloat16 inputs
    state = past.clone()
    y = causal_conv1d(x, weight, b, conv_state=state)
    full = torch.cat([past.transpose(1, 2).double(), x.double()], dim=1)
    expected = causal_conv1d_ref(full, weight.double(), b.double())[:, 3:]
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert_close(y, expected, 2e-2, "y")
    assert torch.equal(state, full[:, -3:].transpose(1, 2).float()), "conv_state"


@pytest.mark.parametrize("state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("l", [1, 2, 37])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernel_matches_the_torch_path(kernel_calls, k, l, state, dtype):
    """Without autograd, on the CPU, the C++ sequence kernel runs: same outputs and final state as the torch
    implementation. x is strided (a slice of a projection's output, as in the mixers); 37 channels leave a
    partial vector."""
    x = torch.randn(3, l, 74, dtype=dtype)[..., :37]
    weight, bias = torch.randn(37, 1, k, dtype=dtype), torch.randn(37, dtype=dtype)
    carried = torch.randn(3, 37, k - 1, dtype=dtype) if state else None
    torch_state = carried.clone() if state else None
    y = causal_conv1d(x, weight, bias, "silu", conv_state=carried)
    with backends.use("torch"):
        expected = causal_conv1d(x, weight, bias, "silu", conv_state=torch_state)
    assert kernel_calls == ["causal_conv1d"]
    assert_close(y, expected, TOL64 if dtype == torch.float64 else TOL32, "y")
    if state:
        assert torch.equal(carried, torch_state), "conv_state"


@pytest.mark.parametrize("activation", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
@pytest.mark.parametrize("bias", BIASES.values(), ids=BIASES.keys())
@pytest.mark.parametrize("k", [1, 2, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_step_token_by_token_matches_reference(backend, dtype, k, bias, activation):
    """causal_conv1d_step on every backend, fed a sequence one token at a time: the reference's outputs, and
    the state ends as the last k - 1 inputs. x strided; 37 channels leave a partial vector."""
    x = torch.randn(2, 6, 74, dtype=dtype)[..., :37]
    weight, b = torch.randn(37, 1, k, dtype=dtype), torch.randn(37, dtype=dtype) if bias else None
    state = torch.zeros(2, 37, k - 1, dtype=dtype)
    with backends.record() as calls:
        ys = [causal_conv1d_step(x[:, t], state, weight, b, activation) for t in range(6)]
    assert {backend for _, backend in calls} == {backend}
    expected = causal_conv1d_ref(x.double(), weight.double(), None if b is None else b.double(), activation)
    assert_close(torch.stack(ys, dim=1), expected, TOL64 if dtype == torch.float64 else TOL32, "y")
    assert torch.equal(state, x[:, 6 - (k - 1) :].transpose(1, 2)) if k > 1 else state.numel() == 0


def test_bfloat16_and_wide_convs_take_the_torch_path(kernel_calls):
    x, weight, b = conv_inputs(2, 5, 3, 4, True, torch.bfloat16)
    causal_conv1d(x, weight, b, conv_state=torch.zeros(2, 3, 3, dtype=torch.bfloat16))
    causal_conv1d_step(x[:, 0], torch.zeros(2, 3, 3, dtype=torch.bfloat16), weight, b)
    x, weight, b = conv_inputs(2, 5, 3, 5, True)
    assert_close(causal_conv1d(x, weight, b), causal_conv1d_ref(x, weight, b), TOL64)
    assert kernel_calls == []
