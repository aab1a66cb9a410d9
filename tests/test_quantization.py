"""torchao int8 weight-only quantisation: logits stay close, high-precision parameters are untouched."""

import pytest
import torch

from ssmblocks.quantization import quantize_int4, quantize_int8
from tests.helpers import rel_err
from tests.test_model import VOCAB, hybrid

pytest.importorskip("torchao")

KEPT = ("A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "norm.weight", "norm2.weight", "norm_f.weight")


@pytest.mark.parametrize("tie", [True, False])
def test_int8_logits_stay_close_and_kept_parameters_are_intact(tie):
    torch.manual_seed(0)
    model = hybrid(tie=tie).eval()
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        before = model(ids).logits
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(KEPT) or "dt_proj" in n}
    quantize_int8(model)
    with torch.no_grad():
        after = model(ids).logits
    err = rel_err(after, before)
    print(f"int8 weight-only, tie={tie}: logits relative error {err:.2e}")
    assert 0 < err < 0.1  # measured 4.4e-2 (max-relative) on this tiny random d_model=32 model
    params = dict(model.named_parameters())
    for name, value in kept.items():
        assert type(params[name]) is torch.nn.Parameter and torch.equal(params[name].detach(), value), name
    quantized = {n for n, p in params.items() if type(p.data) is not torch.Tensor}
    assert any(n.endswith("in_proj.weight") for n in quantized) and any(n.endswith("q_proj.weight") for n in quantized)
    assert "embedding.weight" not in quantized
    assert ("lm_head.weight" in quantized) == (not tie), "an untied head is quantised, a tied one never"


def test_int4_refuses_a_cpu_or_float32_model():
    with pytest.raises(ValueError, match=r"needs a bfloat16 model on CUDA.* on cpu in torch.float32; on CPU use"):
        quantize_int4(hybrid())


@pytest.mark.gpu
def test_int4_on_cuda_keeps_a_linear_layer_close():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(256, 512)).to("cuda", torch.bfloat16)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = layer(x).float()
        quantize_int4(layer, group_size=32)
        after = layer(x).float()
    err = ((after - before).norm() / before.norm()).item()
    print(f"int4 weight-only (group 32), one linear layer: output relative error {err:.2e} (Frobenius)")
    assert type(layer[0].weight.data) is not torch.Tensor and 0 < err < 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("tie", [True, False])
def test_int4_on_cuda_logits_stay_close_and_kept_parameters_are_intact(tie):
    torch.manual_seed(0)
    model = hybrid(tie=tie).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, VOCAB, (2, 13), device="cuda")
    with torch.no_grad():
        before = model(ids).logits.float()
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(KEPT) or "dt_proj" in n}
    quantize_int4(model, group_size=32)
    with torch.no_grad():
        after = model(ids).logits.float()
    err = ((after - before).norm() / before.norm()).item()
    print(f"int4 weight-only (group 32), tie={tie}: logits relative error {err:.2e} (Frobenius)")
    assert 0 < err < 0.5  # every layer's error compounds through this tiny random d_model=32 model
    params = dict(model.named_parameters())
    for name, value in kept.items():
        assert type(params[name]) is torch.nn.Parameter and torch.equal(params[name].detach(), value), name
    quantized = {n for n, p in params.items() if type(p.data) is not torch.Tensor}
    assert any(n.endswith("in_proj.weight") for n in quantized) and any(n.endswith("q_proj.weight") for n in quantized)
    assert ("lm_head.weight" in quantized) == (not tie)
