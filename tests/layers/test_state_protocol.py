"""The state protocol of every stateful layer: one call == chunked calls == token-by-token decode.

Each fp32 path is compared with a float64 run of the same layer (one call, no state), so the
tolerance measures fp32 rounding only. The main cases run on every backend of the machine (``backend``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from ssmblocks import SSD, Attention, CausalConv1d, KVCache, RMSNorm, SelectiveSSM, SSMState, SwiGLU
from tests.helpers import assert_close

D_MODEL = 16
FP32 = 1e-5  # relative error of an fp32 path against the float64 reference
BF16 = 3e-2  # relative error of a bf16 forward against the fp32 one

# The mixers every layer-level test runs: GQA with partial rotary and a head_dim that is not d_model / n_heads;
# SSD with several groups and a head_dim other than 64.
MIXERS: dict[str, Callable[[], nn.Module]] = {
    "selective_ssm": lambda: SelectiveSSM(D_MODEL, d_state=8, d_conv=4, expand=2),
    "ssd": lambda: SSD(D_MODEL, d_state=8, d_conv=4, expand=2, head_dim=8, n_groups=2),
    "attention": lambda: Attention(D_MODEL, n_heads=4, n_kv_heads=2, head_dim=8, rotary_fraction=0.5),
    "causal_conv1d": lambda: CausalConv1d(D_MODEL, kernel_size=4, activation="silu"),
}
SSM_MIXERS = ["selective_ssm", "ssd"]


def spans(total: int, sizes: list[int]) -> list[tuple[int, int]]:
    """[start, end) pieces of the given sizes, then one piece with the rest."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    if start < total:
        bounds.append((start, total))
    return bounds


def run_pieces(layer: nn.Module, x: torch.Tensor, state, pieces: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([layer(x[:, a:b], state=state) for a, b in pieces], dim=1)


def state_tensors(state) -> dict[str, torch.Tensor]:
    return {name: t for name, t in vars(state).items() if isinstance(t, torch.Tensor)}


def float64_reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(layer).double()(x.double())


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_one_call_chunked_and_token_by_token_agree(backend, name, grad):
    layer = MIXERS[name]()
    b, l = 2, 23
    x = torch.randn(b, l, D_MODEL)
    expected = float64_reference(layer, x)
    with torch.set_grad_enabled(grad):
        whole = layer(x)
        whole_with_state = layer(x, state=layer.init_state(b, l))
        chunked = run_pieces(layer, x, layer.init_state(b, l), spans(l, [5, 1, 7]))
        stepped = run_pieces(layer, x, layer.init_state(b, l), spans(l, [1] * l))
    assert_close(whole, expected, FP32, "one call")
    assert_close(whole_with_state, expected, FP32, "one call through a state")
    assert_close(chunked, expected, FP32, "chunks 5, 1, 7, rest")
    assert_close(stepped, expected, FP32, "token by token")


@pytest.mark.parametrize("name", MIXERS)
def test_final_state_is_the_same_whichever_way_the_sequence_is_fed(backend, name):
    layer = MIXERS[name]()
    b, l = 2, 19
    x = torch.randn(b, l, D_MODEL)
    states = {how: layer.init_state(b, l) for how in ("whole", "chunked", "stepped")}
    with torch.no_grad():
        layer(x, state=states["whole"])
        run_pieces(layer, x, states["chunked"], spans(l, [5, 1, 7]))
        run_pieces(layer, x, states["stepped"], spans(l, [1] * l))
        # a continuation decoded from each state must agree too
        nxt = torch.randn(b, 1, D_MODEL)
        outs = {how: layer(nxt, state=s) for how, s in states.items()}
    for how in ("chunked", "stepped"):
        for field, t in state_tensors(states["whole"]).items():
            assert_close(state_tensors(states[how])[field].double(), t.double(), FP32, f"{how} state.{field}")
        assert_close(outs[how], outs["whole"], FP32, f"decode after {how}")


@pytest.mark.parametrize("name", MIXERS)
def test_state_tensors_are_updated_in_place(name):
    layer = MIXERS[name]()
    b = 2
    state = layer.init_state(b, 16)  # large enough: the KV cache must not need to grow
    before = state_tensors(state)
    ptrs = {field: t.data_ptr() for field, t in before.items()}
    with torch.no_grad():
        layer(torch.randn(b, 9, D_MODEL), state=state)  # prefill
        layer(torch.randn(b, 1, D_MODEL), state=state)  # decode
    after = state_tensors(state)
    for field, t in after.items():
        assert t is before[field], f"state.{field} was replaced by a new tensor"
        assert t.data_ptr() == ptrs[field], f"state.{field} was reallocated"
    written = state.k if isinstance(state, KVCache) else state.conv
    assert written.abs().sum() > 0, "the state was not written"
    if isinstance(state, SSMState):
        assert state.ssm.abs().sum() > 0, "the ssm state was not written"
    if isinstance(state, KVCache):
        assert state.length == 10
        assert state.pos.tolist() == [10] * b
        assert bool(state.valid[:, :10].all())


@pytest.mark.parametrize("max_seqlen", [None, 1, 4], ids=lambda m: f"max_seqlen={m}")
def test_attention_cache_grows_past_max_seqlen(max_seqlen):
    layer = MIXERS["attention"]()
    b, l = 2, 23
    x = torch.randn(b, l, D_MODEL)
    expected = float64_reference(layer, x)
    state = layer.init_state(b, max_seqlen)
    with torch.no_grad():
        prefill = run_pieces(layer, x, state, spans(l - 6, [5, 1, 7]))
        decode = run_pieces(layer, x[:, l - 6 :], state, spans(6, [1] * 6))
    assert_close(torch.cat([prefill, decode], dim=1), expected, FP32, "prefill + decode past max_seqlen")
    assert state.length == l and state.capacity >= l
    assert state.k.shape[2] == state.v.shape[2] == state.valid.shape[1] == state.capacity


@pytest.mark.parametrize("name", SSM_MIXERS)
def test_ssm_state_dtype_defaults_to_float32(name):
    layer = MIXERS[name]()
    assert layer.state_dtype == torch.float32
    state = layer.init_state(2, dtype=torch.bfloat16)
    assert state.ssm.dtype == torch.float32
    assert state.conv.dtype == torch.bfloat16


@pytest.mark.parametrize("name", SSM_MIXERS)
def test_bfloat16_layer_keeps_a_float32_ssm_state(name):
    layer = MIXERS[name]()
    b, l = 2, 11
    x = torch.randn(b, l, D_MODEL)
    with torch.no_grad():
        expected = layer(x)
    layer = layer.to(torch.bfloat16)
    state = layer.init_state(b, l)
    assert state.conv.dtype == torch.bfloat16 and state.ssm.dtype == torch.float32
    ssm = state.ssm
    with torch.no_grad():
        out = run_pieces(layer, x.bfloat16(), state, spans(l, [7, 1, 1]))  # prefill, then decode steps
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, BF16, "bf16 prefill + decode")
    assert state.ssm is ssm and state.ssm.dtype == torch.float32
    assert torch.isfinite(state.ssm).all() and state.ssm.abs().sum() > 0


@pytest.mark.parametrize("layer", [RMSNorm(D_MODEL), SwiGLU(D_MODEL, 32)], ids=["rmsnorm", "swiglu"])
def test_stateless_layers_have_no_state(layer):
    assert layer.init_state(2) is None
    assert layer.init_state(2, 8, device="cpu", dtype=torch.float32) is None
