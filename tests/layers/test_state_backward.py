"""Training through a carried state (truncated backpropagation through time): a sequence fed in segments,
each continuing the state the last one left, gives the outputs and the gradients of the whole sequence in one
call, for every stateful layer."""

from __future__ import annotations

import pytest
import torch

from ssmblocks import SSD, Attention, SelectiveSSM
from tests.helpers import assert_close

LAYERS = {
    "selective_ssm": lambda: SelectiveSSM(16, d_state=4),
    "ssd": lambda: SSD(16, d_state=4, head_dim=8, n_groups=2, chunk_size=4),
    "attention": lambda: Attention(16, n_heads=4, n_kv_heads=2),
}
SEGMENTS = {"3_5_4": [3, 5, 4], "token_by_token": [1] * 5 + [7]}


@pytest.mark.parametrize("segments", SEGMENTS.values(), ids=SEGMENTS.keys())
@pytest.mark.parametrize("kind", LAYERS)
def test_segments_through_a_carried_state_give_the_whole_sequence_gradients(kind, segments):
    torch.manual_seed(0)
    layer = LAYERS[kind]().double()
    x = torch.randn(2, sum(segments), 16, dtype=torch.float64, requires_grad=True)
    target = torch.randn_like(x)
    whole = layer(x)
    (whole * target).sum().backward()
    expected = {n: p.grad.clone() for n, p in layer.named_parameters()}
    expected_x = x.grad.clone()
    layer.zero_grad()
    x.grad = None

    state = layer.init_state(2, sum(segments))
    outputs, start = [], 0
    for n in segments:
        outputs.append(layer(x[:, start : start + n], state=state))
        start += n
    pieces = torch.cat(outputs, dim=1)
    (pieces * target).sum().backward()  # one backward through every segment and the state between them
    assert_close(pieces, whole, 1e-8, "outputs")
    assert_close(x.grad, expected_x, 1e-6, "input gradient")
    for name, p in layer.named_parameters():
        assert_close(p.grad, expected[name], 1e-6, name)  # float64; the chunked scans reorder the sums
