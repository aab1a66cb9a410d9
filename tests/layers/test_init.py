"""Parameter initialisation as in the official Mamba / Mamba2 code, and the float32 parameters that survive casts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssmblocks import SSD, SelectiveSSM

# softplus(inverse_softplus(dt)) round-trips in float32 to a few ulps; bounds are checked with this relative slack.
ROUND_TRIP = 1e-5

DT_RANGES = {
    "default": {},  # dt_min=1e-3, dt_max=0.1, floor 1e-4
    "narrow": {"dt_min": 0.01, "dt_max": 0.02},
    "wide": {"dt_min": 1e-4, "dt_max": 1.0, "dt_init_floor": 1e-5},
    "below_floor": {"dt_min": 1e-6, "dt_max": 1e-3, "dt_init_floor": 1e-4},  # the floor lifts the low draws
}


def assert_dt_in_range(dt: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
    low = max(dt_min, dt_init_floor) * (1 - ROUND_TRIP)
    high = max(dt_max, dt_init_floor) * (1 + ROUND_TRIP)
    assert dt.dtype == torch.float32
    assert torch.isfinite(dt).all()
    assert dt.min() >= low, f"softplus(dt bias) min {dt.min().item():.3e} < {low:.3e}"
    assert dt.max() <= high, f"softplus(dt bias) max {dt.max().item():.3e} > {high:.3e}"
    # log-uniform draws fill the range rather than collapse to a point
    if dt_min >= dt_init_floor:
        assert dt.max() / dt.min() > (dt_max / dt_min) ** 0.5


# ---------------------------------------------------------------------------------------------- SelectiveSSM


@pytest.mark.parametrize("dt_kw", DT_RANGES.values(), ids=DT_RANGES.keys())
def test_selective_ssm_dt_bias_is_log_uniform_in_dt_range(dt_kw):
    layer = SelectiveSSM(32, d_state=8, expand=4, **dt_kw)  # 128 channels
    assert_dt_in_range(F.softplus(layer.dt_proj.bias.detach()), **dt_kw)


@pytest.mark.parametrize("d_model, dt_rank", [(32, "auto"), (40, "auto"), (16, 5)], ids=["auto_2", "auto_3", "rank_5"])
def test_selective_ssm_dt_proj_weight_within_dt_rank_bound(d_model, dt_rank):
    layer = SelectiveSSM(d_model, d_state=4, dt_rank=dt_rank)
    expected_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
    assert layer.dt_rank == expected_rank
    assert layer.dt_proj.weight.shape == (layer.d_inner, expected_rank)
    w = layer.dt_proj.weight.detach()
    bound = expected_rank**-0.5
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.5 * bound, "uniform in +-dt_rank**-0.5 should come near the bound"


def test_selective_ssm_A_log_and_D():
    layer = SelectiveSSM(16, d_state=6)
    assert layer.A_log.shape == (layer.d_inner, 6) and layer.A_log.dtype == torch.float32
    expected = torch.log(torch.arange(1, 7, dtype=torch.float32)).expand(layer.d_inner, -1)
    assert torch.equal(layer.A_log.detach(), expected), "A_log must be log(1..n) in every channel"
    assert layer.D.shape == (layer.d_inner,) and layer.D.dtype == torch.float32
    assert torch.equal(layer.D.detach(), torch.ones(layer.d_inner))


# ---------------------------------------------------------------------------------------------- SSD


@pytest.mark.parametrize("dt_kw", DT_RANGES.values(), ids=DT_RANGES.keys())
def test_ssd_dt_bias_is_log_uniform_in_dt_range(dt_kw):
    layer = SSD(32, d_state=8, expand=4, head_dim=1, **dt_kw)  # 128 heads
    assert layer.dt_bias.shape == (128,)
    assert_dt_in_range(F.softplus(layer.dt_bias.detach()), **dt_kw)


@pytest.mark.parametrize("A_init_range", [(1.0, 16.0), (2.0, 3.0)], ids=["default", "custom"])
def test_ssd_A_log_within_A_init_range(A_init_range):
    layer = SSD(32, d_state=8, expand=4, head_dim=1, A_init_range=A_init_range)
    A = torch.exp(layer.A_log.detach())
    low, high = A_init_range
    assert layer.A_log.dtype == torch.float32
    assert A.min() >= low * (1 - ROUND_TRIP) and A.max() <= high * (1 + ROUND_TRIP)
    assert A.max() - A.min() > 0.5 * (high - low), "uniform draws should spread over the range"


@pytest.mark.parametrize("D_has_hdim", [False, True], ids=["D_per_head", "D_per_channel"])
def test_ssd_D_is_one(D_has_hdim):
    layer = SSD(16, d_state=8, head_dim=8, D_has_hdim=D_has_hdim)  # e = 32, h = 4
    expected_shape = (32,) if D_has_hdim else (4,)
    assert layer.D.shape == expected_shape and layer.D.dtype == torch.float32
    assert torch.equal(layer.D.detach(), torch.ones(expected_shape))


# ---------------------------------------------------------------------------------------------- casts

KEEP_FLOAT32 = {
    "selective_ssm": (lambda **kw: SelectiveSSM(16, d_state=8, **kw), ["A_log", "D"]),
    "ssd": (lambda **kw: SSD(16, d_state=8, head_dim=8, n_groups=2, **kw), ["A_log", "D", "dt_bias"]),
    "ssd_D_has_hdim": (lambda **kw: SSD(16, d_state=8, head_dim=8, D_has_hdim=True, **kw), ["A_log", "D", "dt_bias"]),
}
CASTS = {
    "to_bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "to_device_and_bf16": (lambda m: m.to(device="cpu", dtype=torch.bfloat16), torch.bfloat16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "half": (lambda m: m.half(), torch.float16),
}


@pytest.mark.parametrize("layer_name", KEEP_FLOAT32)
@pytest.mark.parametrize("cast", CASTS, ids=CASTS.keys())
def test_cast_keeps_ssm_parameters_float32_and_bit_identical(layer_name, cast):
    make, kept = KEEP_FLOAT32[layer_name]
    fn, dtype = CASTS[cast]
    layer = make()
    # give the kept parameters values that bf16/fp16 cannot hold, so a round trip through them would show
    with torch.no_grad():
        for name in kept:
            getattr(layer, name).add_(torch.rand_like(getattr(layer, name)) * 1e-3)
    before = {name: getattr(layer, name).detach().clone() for name in kept}
    out = fn(layer)
    assert out is layer
    assert layer.in_proj.weight.dtype == dtype
    assert layer.out_proj.weight.dtype == dtype
    assert layer.conv1d.weight.dtype == dtype
    for name in kept:
        param = getattr(layer, name)
        assert isinstance(param, torch.nn.Parameter), f"{name} is no longer a Parameter"
        assert param.dtype == torch.float32, f"{name} became {param.dtype}"
        assert torch.equal(param.detach(), before[name]), f"{name} changed value in the cast"
    assert set(dict(layer.named_parameters())) >= set(kept)


@pytest.mark.parametrize("layer_name", KEEP_FLOAT32)
def test_layer_built_in_bf16_has_float32_ssm_parameters(layer_name):
    make, kept = KEEP_FLOAT32[layer_name]
    layer = make(dtype=torch.bfloat16)
    assert layer.in_proj.weight.dtype == torch.bfloat16
    for name in kept:
        assert getattr(layer, name).dtype == torch.float32, name
    assert torch.equal(layer.D.detach(), torch.ones_like(layer.D))


@pytest.mark.parametrize("layer_name", KEEP_FLOAT32)
def test_double_cast_promotes_ssm_parameters(layer_name):
    make, kept = KEEP_FLOAT32[layer_name]
    layer = make()
    before = {name: getattr(layer, name).detach().clone() for name in kept}
    layer.double()
    for name in kept:
        param = getattr(layer, name)
        assert param.dtype == torch.float64, f"{name} stayed {param.dtype}"
        assert torch.equal(param.detach(), before[name].double())
