"""The Triton causal conv1d (kernels/conv1d.py) against causal_conv1d_torch in float64: forward, the carried
state and every gradient; the one-token step against causal_conv1d_step_torch.

On a machine without CUDA the kernels run in Triton's interpreter (conftest.py), so shapes stay tiny.
"""

import pytest
import torch

from ssmblocks.ops.conv import causal_conv1d_ref, causal_conv1d_step_torch, causal_conv1d_torch
from tests.helpers import assert_close

pytest.importorskip("triton")
from ssmblocks.kernels.conv1d import (  # noqa: E402
    causal_conv1d_fwd,
    causal_conv1d_step_op,
    causal_conv1d_step_triton,
    causal_conv1d_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

CASES = {
    # name: (b, l, c, k, bias, activation, conv_state, left padding per row or None)
    "k4-silu": (2, 37, 24, 4, True, "silu", False, None),
    "k3-nobias-state": (2, 21, 20, 3, False, None, True, None),
    "k2-silu-state-mask-a-row-all-padding": (3, 19, 16, 2, True, "silu", True, [0, 4, 19]),
    "k4-silu-mask": (2, 23, 24, 4, True, "silu", False, [6, 0]),
    "k4-state-mask-len2": (2, 2, 20, 4, True, "silu", True, [1, 0]),  # shorter than the state
}


def make_case(b, l, c, k, has_bias, has_state, pads, dtype=torch.float32):
    """Leaves (wide, weight, bias), x = wide[..., 2 : 2 + c] (a strided view, as the SSD layer's), conv_state
    and mask (b, l) bool left padding."""
    leaves = dict(
        wide=torch.randn(b, l, c + 5, dtype=dtype, device=DEVICE),
        weight=torch.randn(c, 1, k, dtype=dtype, device=DEVICE),
        bias=torch.randn(c, dtype=dtype, device=DEVICE) if has_bias else None,
    )
    leaves = {n: None if t is None else t.requires_grad_(True) for n, t in leaves.items()}
    state = torch.randn(b, c, k - 1, dtype=dtype, device=DEVICE) if has_state else None
    mask = None
    if pads is not None:
        mask = torch.arange(l, device=DEVICE)[None, :] >= torch.tensor(pads, device=DEVICE)[:, None]
    return leaves, state, mask


def run(conv, leaves, state, mask, activation, c):
    x = leaves["wide"][..., 2 : 2 + c]
    return conv(x, leaves["weight"], leaves["bias"], activation, state, mask)


def as_float64(leaves):
    return {n: None if t is None else t.detach().double().requires_grad_(True) for n, t in leaves.items()}


def check_gradients(y, y_ref, dy, leaves, ref_leaves, tol):
    """Backward dy (float64) through y and the reference's y_ref; every leaf's gradient against the reference's."""
    y.backward(dy.to(y.dtype))
    y_ref.backward(dy)
    for name, leaf in leaves.items():
        if leaf is not None:
            assert_close(leaf.grad, ref_leaves[name].grad, tol, f"d{name}")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_state_and_gradients(case):
    b, l, c, k, has_bias, activation, has_state, pads = CASES[case]
    leaves, state, mask = make_case(b, l, c, k, has_bias, has_state, pads)
    ref_leaves, ref_state = as_float64(leaves), None if state is None else state.double()
    y = run(causal_conv1d_triton, leaves, state, mask, activation, c)
    y_ref = run(causal_conv1d_torch, ref_leaves, ref_state, mask, activation, c)
    real = torch.ones(b, l, 1, dtype=torch.bool, device=DEVICE) if mask is None else mask[..., None]
    assert y.dtype == torch.float32
    assert_close(y * real, y_ref * real, TOL[torch.float32], "y")  # padded outputs are unspecified
    if state is not None:
        assert_close(state, ref_state, TOL[torch.float32], "conv_state")
    check_gradients(y, y_ref, torch.randn_like(y_ref) * real, leaves, ref_leaves, TOL[torch.float32])


def test_matches_the_sequential_reference_without_state():
    leaves, _, _ = make_case(1, 29, 12, 4, True, False, None)
    y = run(causal_conv1d_triton, leaves, None, None, "silu", 12)
    ref = as_float64(leaves)
    assert_close(y, causal_conv1d_ref(ref["wide"][..., 2:14], ref["weight"], ref["bias"], "silu"), 1e-5, "y")


def test_bfloat16_with_state():
    leaves, state, _ = make_case(2, 25, 16, 4, True, True, None, dtype=torch.bfloat16)
    ref_leaves, ref_state = as_float64(leaves), state.double()
    y = run(causal_conv1d_triton, leaves, state, None, "silu", 16)
    y_ref = run(causal_conv1d_torch, ref_leaves, ref_state, None, "silu", 16)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    assert_close(y, y_ref, TOL[torch.bfloat16], "y")
    assert_close(state, ref_state, TOL[torch.bfloat16], "conv_state")
    check_gradients(y, y_ref, torch.randn_like(y_ref), leaves, ref_leaves, TOL[torch.bfloat16])


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["state-fp32", "state-bf16"])
def test_step_matches_torch_and_a_sequence(k, state_dtype):
    b, c, steps = 3, 20, 5
    x = torch.randn(b, steps, c, device=DEVICE)
    weight, bias = torch.randn(c, 1, k, device=DEVICE), torch.randn(c, device=DEVICE)
    state = torch.randn(b, c, k - 1, device=DEVICE).to(state_dtype)
    ref_state = state.clone()
    ys, ys_ref = [], []
    for t in range(steps):
        ys.append(causal_conv1d_step_triton(x[:, t], state, weight, bias, "silu"))
        ys_ref.append(causal_conv1d_step_torch(x[:, t], ref_state, weight, bias, "silu"))
    # a bfloat16 state rounds each stored input (Triton's interpreter truncates where CUDA rounds to nearest)
    tol = 1e-6 if state_dtype == torch.float32 else 1e-2
    assert_close(torch.stack(ys, 1), torch.stack(ys_ref, 1), tol, "y")
    assert_close(state, ref_state, tol, "conv_state")


@pytest.mark.parametrize("activation", ["silu", None])
def test_packed_sequences_match_separate_runs(activation):
    """cu_seqlens: sequences of 1 and 2 tokens (shorter than the window), and ones across the kernels' 32-token
    blocks; the output and every gradient against causal_conv1d_ref on each sequence alone (float64)."""
    lengths, c = [1, 2, 30, 5, 40], 12
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    leaves, _, _ = make_case(1, sum(lengths), c, 4, True, False, None)
    ref = as_float64(leaves)
    y = causal_conv1d_triton(leaves["wide"][..., 2 : 2 + c], leaves["weight"], leaves["bias"], activation,
                             cu_seqlens=cu_seqlens)  # fmt: skip
    x_ref = ref["wide"][..., 2 : 2 + c]
    y_ref = torch.cat([causal_conv1d_ref(x_ref[:, a:b], ref["weight"], ref["bias"], activation)
                       for a, b in zip(bounds[:-1], bounds[1:], strict=True)], 1)  # fmt: skip
    assert_close(y, y_ref, TOL[torch.float32], "y")
    check_gradients(y, y_ref, torch.randn_like(y_ref), leaves, ref, TOL[torch.float32])


def test_custom_ops_pass_opcheck():
    x = torch.randn(2, 5, 4, device=DEVICE, requires_grad=True)
    weight = torch.randn(4, 1, 3, device=DEVICE, requires_grad=True)
    bias = torch.randn(4, device=DEVICE, requires_grad=True)
    state, n_pad = torch.randn(2, 4, 2, device=DEVICE), torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(causal_conv1d_fwd, (x, weight, bias, state, n_pad, None, True))
    seq_first = torch.tensor([0, 0, 2, 2, 2], dtype=torch.int32, device=DEVICE)  # packed: sequences 0-1 and 2-4
    torch.library.opcheck(causal_conv1d_fwd, (x[:1], weight, bias, None, None, seq_first, True))
    torch.library.opcheck(
        causal_conv1d_step_op, (x[:, 0].detach(), state, weight.detach(), bias.detach(), True, None)
    )


def test_compiles_without_graph_breaks():
    leaves, _, _ = make_case(1, 11, 8, 4, True, False, None)

    def loss(leaves):
        return run(causal_conv1d_triton, leaves, None, None, "silu", 8).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(leaves), [leaves["wide"], leaves["weight"]])
    want = torch.autograd.grad(loss(leaves), [leaves["wide"], leaves["weight"]])
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, 1e-6)


@pytest.mark.parametrize(
    "weight, bias, activation, message",
    [
        (torch.ones(8, 1, 5), None, None, "2 <= k <= 4"),
        (torch.ones(7, 1, 4), None, None, "weight must be"),
        (torch.ones(8, 1, 4), torch.ones(3), None, "bias must be"),
        (torch.ones(8, 1, 4), None, "relu", "activation"),
    ],
    ids=["width", "channels", "bias", "activation"],
)
def test_bad_arguments_name_the_problem(weight, bias, activation, message):
    with pytest.raises(ValueError, match=message):
        causal_conv1d_triton(torch.ones(1, 3, 8), weight, bias, activation)
