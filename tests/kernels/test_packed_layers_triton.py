"""Packed sequences (cu_seqlens) through the SSM layers under the "triton" selection: the conv and the scan take
the packed batch as it is (batch 1, with cu_seqlens; no padded copy), and the packed forward and backward equal
each sequence run alone.

On a machine without CUDA the kernels run in Triton's interpreter (conftest.py), so shapes stay tiny.
"""

import pytest
import torch

from ssmblocks import backends
from ssmblocks.layers import SSD, CausalConv1d, SelectiveSSM
from tests.helpers import assert_close, randomise

pytest.importorskip("triton")
from ssmblocks.kernels import conv1d, selective_scan, ssd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4
LAYERS = {
    "SSD": lambda: SSD(d_model=16, d_state=16, head_dim=8, n_groups=2, chunk_size=16),
    "SelectiveSSM": lambda: SelectiveSSM(d_model=8, d_state=4),
    "CausalConv1d": lambda: CausalConv1d(8, 4, activation="silu"),
}
# the kernel entry each layer's conv and scan reach, by module and function name
KERNELS = {
    "SSD": [(conv1d, "causal_conv1d_triton"), (ssd, "ssd_chunked_triton")],
    "SelectiveSSM": [(conv1d, "causal_conv1d_triton"), (selective_scan, "selective_scan_triton")],
    "CausalConv1d": [(conv1d, "causal_conv1d_triton")],
}


@pytest.mark.parametrize("name", LAYERS)
def test_packed_layer_runs_the_kernels_on_the_packed_batch(name, monkeypatch):
    layer = LAYERS[name]().to(DEVICE)
    randomise(layer)
    lengths = [5, 1, 19, 3]
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    cu_seqlens = torch.tensor(bounds, device=DEVICE)  # int64: the layers take any integer dtype
    x = torch.randn(1, sum(lengths), layer.width, device=DEVICE)
    weight = torch.randn_like(x)  # a loss that weighs every output differently

    seen = []

    def spying(kernel, fn):
        def spy(*args, **kwargs):
            seen.append((fn, args[0].shape[0], kwargs.get("cu_seqlens") is not None))
            return kernel(*args, **kwargs)

        return spy

    for module, fn in KERNELS[name]:
        monkeypatch.setattr(module, fn, spying(getattr(module, fn), fn))

    packed_x = x.clone().requires_grad_()
    with backends.use("triton"):
        packed = layer(packed_x, cu_seqlens=cu_seqlens)
    assert sorted(seen) == sorted((fn, 1, True) for _, fn in KERNELS[name])  # once each, on the packed batch
    (packed * weight).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    separate_x = x.clone().requires_grad_()
    with backends.use("triton"):
        separate = torch.cat([layer(separate_x[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], 1)
    (separate * weight).sum().backward()
    assert_close(packed, separate, TOL, "packed output")
    assert_close(packed_x.grad, separate_x.grad, TOL, "grad wrt the packed input")
    for n, p in layer.named_parameters():
        assert_close(packed_grads[n], p.grad, TOL, f"grad wrt {n}")
