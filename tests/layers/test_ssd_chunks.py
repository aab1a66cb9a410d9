"""The SSD layer's chunk size changes the order of the arithmetic, never the result."""

import pytest
import torch

from ssmblocks import SSD
from tests.helpers import assert_close


@pytest.mark.parametrize("chunk_size", [1, 4, 7])
def test_small_chunks_match_one_chunk_and_decode(chunk_size):
    big = SSD(16, d_state=8, head_dim=8, n_groups=2, chunk_size=64)
    small = SSD(16, d_state=8, head_dim=8, n_groups=2, chunk_size=chunk_size)
    small.load_state_dict(big.state_dict())
    x = torch.randn(2, 37, 16)
    with torch.no_grad():
        expected = big(x)
        assert_close(small(x), expected, 1e-5, "one call")
        state = small.init_state(2)
        steps = torch.cat(
            [small(x[:, :10], state=state), *[small(x[:, t : t + 1], state=state) for t in range(10, 37)]], 1
        )
    assert_close(steps, expected, 1e-5, "prefill then decode")
