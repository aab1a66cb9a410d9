"""Packed sequences on the CPU: a training step (forward and backward) of one SSM layer over a pack of unequal
sequences, as ``cu_seqlens`` against the same sequences as one right-padded batch (what packing cost before
the scans grouped sequences by length).

Run:  python -m pytest tests/benchmarks/test_cpu_packed.py --benchmark-only -p no:randomly
(deselected from the default run by --benchmark-skip in pyproject.toml). fp32, d_model 256, random weights.
"""

from __future__ import annotations

import pytest
import torch

from ssmblocks.layers import SSD, SelectiveSSM

PACKS = {"1x1024+30x32": [1024] + [32] * 30, "8x256": [256] * 8}
LAYERS = {
    "SSD": lambda: SSD(d_model=256, d_state=64, head_dim=64),
    "SelectiveSSM": lambda: SelectiveSSM(d_model=256, d_state=16),
}


@pytest.mark.parametrize("pack", PACKS)
@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_train_step(benchmark, layer_name, pack, layout):
    torch.manual_seed(0)
    layer, lengths = LAYERS[layer_name](), PACKS[pack]
    benchmark.group = f"{layer_name} {pack}"
    if layout == "packed":
        x = torch.randn(1, sum(lengths), 256, requires_grad=True)
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        kwargs = {"cu_seqlens": cu_seqlens}
    else:  # right padding never reaches a real position of a causal layer
        x = torch.randn(len(lengths), max(lengths), 256, requires_grad=True)
        kwargs = {}

    def step():
        layer(x, **kwargs).square().mean().backward()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
