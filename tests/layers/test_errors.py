"""Bad input gets a typed error whose message names the layer and the problem."""

from __future__ import annotations

import re

import pytest
import torch

from ssmblocks import (
    SSD,
    Attention,
    CausalConv1d,
    GatedRMSNorm,
    RMSNorm,
    SelectiveSSM,
    ShapeError,
    StateError,
    SwiGLU,
)
from tests.layers.test_state_protocol import D_MODEL, MIXERS


def raises(exc: type[Exception], layer: torch.nn.Module, pattern: str):
    """pytest.raises for an error of type ``exc`` whose message starts with the layer's name and matches pattern."""
    return pytest.raises(exc, match=rf"^{type(layer).__name__}: .*{pattern}")


def cu(*bounds: int, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor(bounds, dtype=dtype)


@pytest.fixture(params=list(MIXERS))
def mixer(request):
    return MIXERS[request.param]()


# ---------------------------------------------------------------------------------------------- input tensor


def test_2d_input(mixer):
    with raises(ShapeError, mixer, re.escape(f"(batch, seqlen, {D_MODEL}), got rank 2 shape (5, {D_MODEL})")):
        mixer(torch.randn(5, D_MODEL))


def test_4d_input(mixer):
    with raises(ShapeError, mixer, "got rank 4"):
        mixer(torch.randn(1, 2, 5, D_MODEL))


def test_input_not_a_tensor(mixer):
    with raises(TypeError, mixer, "expected a torch.Tensor input, got list"):
        mixer([[0.0] * D_MODEL])


def test_integer_input(mixer):
    with raises(TypeError, mixer, "floating"):
        mixer(torch.ones(2, 5, D_MODEL, dtype=torch.long))


def test_wrong_d_model(mixer):
    with raises(ShapeError, mixer, f"last dimension {D_MODEL - 4}.*d_model={D_MODEL}"):
        mixer(torch.randn(2, 5, D_MODEL - 4))


def test_empty_sequence(mixer):
    with raises(ShapeError, mixer, r"empty sequence \(seqlen 0\)"):
        mixer(torch.randn(2, 0, D_MODEL))


def test_empty_sequence_with_state(mixer):
    with raises(ShapeError, mixer, r"empty sequence \(seqlen 0\)"):
        mixer(torch.randn(2, 0, D_MODEL), state=mixer.init_state(2, 8))


def test_empty_batch(mixer):
    with raises(ShapeError, mixer, r"empty batch \(batch size 0\)"):
        mixer(torch.randn(0, 5, D_MODEL))


# ---------------------------------------------------------------------------------------------- state


def test_state_for_another_batch_size(mixer):
    with raises(StateError, mixer, r"made for batch size 3, but the input has batch size 2"):
        mixer(torch.randn(2, 5, D_MODEL), state=mixer.init_state(3, 8))


def test_state_for_another_dtype(mixer):
    with raises(StateError, mixer, r"made for dtype torch.float64, but the input is torch.float32"):
        mixer(torch.randn(2, 5, D_MODEL), state=mixer.init_state(2, 8, dtype=torch.float64))


def test_state_on_another_device(mixer):
    with raises(StateError, mixer, r"is on meta, the input on cpu"):
        mixer(torch.randn(2, 5, D_MODEL), state=mixer.init_state(2, 8, device="meta"))


WRONG_STATE_FROM = {"selective_ssm": "attention", "ssd": "attention", "attention": "ssd", "causal_conv1d": "ssd"}


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("seqlen", [1, 5], ids=["decode", "prefill"])
def test_state_of_the_wrong_type(name, seqlen):
    layer, other = MIXERS[name](), MIXERS[WRONG_STATE_FROM[name]]()
    state = other.init_state(2, 8)
    with raises(
        StateError, layer, f"expected a {type(layer.init_state(1)).__name__} state, got {type(state).__name__}"
    ):
        layer(torch.randn(2, seqlen, D_MODEL), state=state)


def test_state_that_is_not_a_state(mixer):
    with raises(StateError, mixer, "got tuple"):
        mixer(torch.randn(2, 5, D_MODEL), state=(None, None))


# A state of the right class made for a layer of another shape.
MISFIT_STATES = {
    "selective_ssm_state_to_ssd": ("ssd", lambda: SelectiveSSM(D_MODEL, d_state=8)),
    "ssd_state_to_selective_ssm": ("selective_ssm", lambda: SSD(D_MODEL, d_state=8, head_dim=8)),
    "ssd_other_d_state": ("ssd", lambda: SSD(D_MODEL, d_state=4, head_dim=8, n_groups=2)),
    "selective_ssm_other_d_conv": ("selective_ssm", lambda: SelectiveSSM(D_MODEL, d_state=8, d_conv=3)),
    "attention_other_kv_heads": ("attention", lambda: Attention(D_MODEL, n_heads=4, n_kv_heads=4, head_dim=8)),
    "attention_other_head_dim": ("attention", lambda: Attention(D_MODEL, n_heads=4, n_kv_heads=2, head_dim=4)),
    "conv_other_kernel": ("causal_conv1d", lambda: CausalConv1d(D_MODEL, kernel_size=3)),
}


@pytest.mark.parametrize("case", MISFIT_STATES)
@pytest.mark.parametrize("seqlen", [1, 5], ids=["decode", "prefill"])
def test_state_made_for_a_layer_of_another_shape(case, seqlen):
    name, make_other = MISFIT_STATES[case]
    layer = MIXERS[name]()
    with raises(StateError, layer, r"state\.(conv|ssm|k|v) .*shape"):
        layer(torch.randn(2, seqlen, D_MODEL), state=make_other().init_state(2, 8))


# ---------------------------------------------------------------------------------------------- cu_seqlens


def test_cu_seqlens_ends_early(mixer):
    with raises(ShapeError, mixer, r"from 0 to the packed length 10, got 0 \.\. 8"):
        mixer(torch.randn(1, 10, D_MODEL), cu_seqlens=cu(0, 4, 8))


def test_cu_seqlens_ends_beyond(mixer):
    with raises(ShapeError, mixer, r"from 0 to the packed length 10, got 0 \.\. 12"):
        mixer(torch.randn(1, 10, D_MODEL), cu_seqlens=cu(0, 4, 12))


def test_cu_seqlens_not_starting_at_0(mixer):
    with raises(ShapeError, mixer, r"from 0 to the packed length 10, got 1 \.\. 10"):
        mixer(torch.randn(1, 10, D_MODEL), cu_seqlens=cu(1, 4, 10))


def test_cu_seqlens_with_an_empty_sequence(mixer):
    with raises(ShapeError, mixer, "strictly increasing; sequence 1 has length 0"):
        mixer(torch.randn(1, 10, D_MODEL), cu_seqlens=cu(0, 4, 4, 10))


def test_cu_seqlens_decreasing(mixer):
    with raises(ShapeError, mixer, "strictly increasing; sequence 1 has length -2"):
        mixer(torch.randn(1, 10, D_MODEL), cu_seqlens=cu(0, 6, 4, 10))


def test_cu_seqlens_with_batch_2(mixer):
    with raises(ShapeError, mixer, r"packed input \(cu_seqlens\) must have batch size 1, got 2"):
        mixer(torch.randn(2, 10, D_MODEL), cu_seqlens=cu(0, 4, 10))


@pytest.mark.parametrize(
    "bad",
    [cu(0, 4, 10, dtype=torch.float32), cu(0, 4, 10).view(1, 3), [0, 4, 10]],
    ids=["float", "2d", "list"],
)
def test_cu_seqlens_not_a_1d_integer_tensor(mixer, bad):
    with raises(ShapeError, mixer, "cu_seqlens must be a 1-D integer tensor"):
        mixer(torch.randn(1, 10, D_MODEL), cu_seqlens=bad)


def test_cu_seqlens_with_one_entry(mixer):
    with raises(ShapeError, mixer, "cu_seqlens needs at least 2 entries"):
        mixer(torch.randn(1, 10, D_MODEL), cu_seqlens=cu(0))


def test_cu_seqlens_with_a_state(mixer):
    with raises(StateError, mixer, "cu_seqlens .* cannot be combined with a state"):
        mixer(torch.randn(1, 10, D_MODEL), state=mixer.init_state(1, 10), cu_seqlens=cu(0, 4, 10))


def test_cu_seqlens_with_attention_mask(mixer):
    with raises(ShapeError, mixer, "either cu_seqlens .* or attention_mask .*, not both"):
        mixer(torch.randn(1, 10, D_MODEL), attention_mask=torch.ones(1, 10), cu_seqlens=cu(0, 4, 10))


# ---------------------------------------------------------------------------------------------- attention_mask


@pytest.mark.parametrize("shape", [(2, 4), (5,), (1, 5)], ids=["short", "1d", "batch_1"])
def test_attention_mask_wrong_shape(mixer, shape):
    expected = re.escape(f"attention_mask has shape {shape}, expected (batch, seqlen) = (2, 5)")
    with raises(ShapeError, mixer, expected):
        mixer(torch.randn(2, 5, D_MODEL), attention_mask=torch.ones(shape))


@pytest.mark.parametrize(
    "row", [[1, 1, 1, 0, 0], [0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], ids=["right_padded", "hole", "first_only"]
)
def test_attention_mask_not_left_padded(mixer, row):
    mask = torch.tensor([[1, 1, 1, 1, 1], row])
    with raises(ShapeError, mixer, "must be left-padded .* a real token is followed by padding"):
        mixer(torch.randn(2, 5, D_MODEL), attention_mask=mask)


def test_attention_mask_not_left_padded_with_state(mixer):
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with raises(ShapeError, mixer, "must be left-padded"):
        mixer(torch.randn(2, 5, D_MODEL), state=mixer.init_state(2, 8), attention_mask=mask)


def test_attention_mask_not_a_tensor(mixer):
    with raises(TypeError, mixer, "attention_mask"):
        mixer(torch.randn(2, 5, D_MODEL), attention_mask=[[1] * 5] * 2)


# ---------------------------------------------------------------------------------------------- constructors


def test_ssd_head_dim_not_dividing_d_inner():
    with pytest.raises(ValueError, match=r"^SSD: head_dim=12 must divide d_inner = expand \* d_model = 32"):
        SSD(16, head_dim=12)


def test_ssd_n_groups_not_dividing_heads():
    with pytest.raises(ValueError, match=r"^SSD: n_groups=3 must divide the number of heads 4"):
        SSD(16, head_dim=8, n_groups=3)


def test_attention_n_kv_heads_not_dividing_n_heads():
    with pytest.raises(ValueError, match=r"^Attention: n_kv_heads=3 must .*divide n_heads=4"):
        Attention(16, n_heads=4, n_kv_heads=3)


def test_attention_n_heads_not_dividing_d_model():
    with pytest.raises(ValueError, match=r"^Attention: n_heads=4 must divide d_model=10 \(or give head_dim\)"):
        Attention(10, n_heads=4)


@pytest.mark.parametrize("fraction", [-0.5, 1.5])
def test_attention_rotary_fraction_out_of_range(fraction):
    with pytest.raises(ValueError, match=rf"^Attention: rotary_fraction must be in \[0, 1\], got {fraction}"):
        Attention(16, n_heads=4, rotary_fraction=fraction)


@pytest.mark.parametrize("group_size", [5, 0, -4])
def test_gated_rms_norm_bad_group_size(group_size):
    with pytest.raises(ValueError, match=rf"^GatedRMSNorm: group_size={group_size} must divide dim=16"):
        GatedRMSNorm(16, group_size=group_size)


@pytest.mark.parametrize("activation", ["relu", "SiLU", ""])
def test_causal_conv1d_bad_activation(activation):
    with pytest.raises(ValueError, match=rf"^CausalConv1d: activation must be None or 'silu', got '{activation}'"):
        CausalConv1d(16, activation=activation)


def test_selective_ssm_bad_dt_rank_string():
    with pytest.raises(ValueError, match=r"^SelectiveSSM: dt_rank"):
        SelectiveSSM(16, dt_rank="big")


SIZES = {
    "selective_ssm": (SelectiveSSM, {"d_model": 16}, ["d_model", "d_state", "d_conv", "expand", "dt_rank"]),
    "ssd": (SSD, {"d_model": 16, "head_dim": 8}, ["d_model", "d_state", "d_conv", "expand", "head_dim", "n_groups"]),
    "ssd_chunk": (SSD, {"d_model": 16, "head_dim": 8}, ["chunk_size"]),
    "attention": (Attention, {"d_model": 16, "n_heads": 4}, ["d_model", "n_heads", "n_kv_heads", "head_dim"]),
    "causal_conv1d": (CausalConv1d, {"channels": 16}, ["channels", "kernel_size"]),
    "rms_norm": (RMSNorm, {"dim": 16}, ["dim"]),
    "gated_rms_norm": (GatedRMSNorm, {"dim": 16}, ["dim"]),
    "swiglu": (SwiGLU, {"d_model": 16, "hidden_dim": 32}, ["d_model", "hidden_dim"]),
}


def _size_cases():
    for key, (cls, base, fields) in SIZES.items():
        for field in fields:
            for value in (0, -1):
                yield pytest.param(cls, base, field, value, id=f"{key}-{field}={value}")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("cls, base, field, value", _size_cases())
def test_non_positive_size(cls, base, field, value):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: {field}\b.*positive"):
        cls(**{**base, field: value})


# ---------------------------------------------------------------------------------------------- norms and MLP


def test_rms_norm_wrong_last_dim():
    layer = RMSNorm(16)
    with raises(ShapeError, layer, "last dimension 12, but the norm was built with dim=16"):
        layer(torch.randn(2, 3, 12))


def test_swiglu_wrong_last_dim():
    layer = SwiGLU(16, 32)
    with raises(ShapeError, layer, "last dimension 12, but d_model=16"):
        layer(torch.randn(2, 3, 12))


def test_gated_rms_norm_wrong_last_dim():
    layer = GatedRMSNorm(16)
    with raises(ShapeError, layer, "last dimension 12, but the norm was built with dim=16"):
        layer(torch.randn(2, 3, 12), torch.randn(2, 3, 12))


def test_gated_rms_norm_gate_shape_mismatch():
    layer = GatedRMSNorm(16)
    with raises(ShapeError, layer, re.escape("gate z has shape (2, 3, 8), x has (2, 3, 16)")):
        layer(torch.randn(2, 3, 16), torch.randn(2, 3, 8))


# ---------------------------------------------------------------------------------------------- value checks


def test_attention_mask_values_not_zero_or_one(mixer):
    mask = torch.tensor([[0, 2, 1, 1, 1], [1, 1, 1, 1, 1]])
    with raises(ShapeError, mixer, r"only 0 \(padding\) and 1"):
        mixer(torch.randn(2, 5, D_MODEL), attention_mask=mask)


def test_cu_seqlens_bool(mixer):
    with raises(ShapeError, mixer, "1-D integer tensor"):
        mixer(torch.randn(1, 2, D_MODEL), cu_seqlens=torch.tensor([False, True]))


@pytest.mark.parametrize("name", ["selective_ssm", "ssd"])
def test_ssm_state_in_another_dtype_than_state_dtype(name):
    layer = MIXERS[name]()
    state = layer.init_state(2)
    state.ssm = state.ssm.to(torch.float16)
    with raises(StateError, layer, r"state\.ssm has dtype torch.float16, but the layer keeps it in torch.float32"):
        layer(torch.randn(2, 3, D_MODEL), state=state)


@pytest.mark.parametrize(
    "make",
    [lambda: SelectiveSSM(16), lambda: SSD(16, head_dim=8), lambda: Attention(16, n_heads=2)],
    ids=["m1", "m2", "a"],
)
def test_an_input_of_another_dtype_is_named(make):
    with pytest.raises(TypeError, match=r"input dtype torch.float64 differs from the layer's torch.float32"):
        make()(torch.randn(1, 3, 16, dtype=torch.float64))
