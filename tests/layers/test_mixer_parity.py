"""SelectiveSSM and SSD equal transformers' MambaMixer and Mamba2Mixer given the same weights (fp32)."""

import pytest
import torch

from ssmblocks import SSD, SelectiveSSM
from tests.helpers import assert_close, randomise

tf = pytest.importorskip("transformers")


MAMBA = {
    "d16-n4-bias": dict(hidden_size=16, state_size=4, expand=2, conv_kernel=4, use_bias=True, use_conv_bias=True),
    "d24-n16-nobias-k3": dict(
        hidden_size=24, state_size=16, expand=2, conv_kernel=3, use_bias=False, use_conv_bias=False
    ),
    "d32-n8-rank5-expand3": dict(hidden_size=32, state_size=8, expand=3, conv_kernel=4, time_step_rank=5),
}


@pytest.mark.parametrize("name", MAMBA)
def test_selective_ssm_matches_mamba_mixer(name):
    cfg = tf.MambaConfig(num_hidden_layers=1, **MAMBA[name])
    theirs = tf.models.mamba.modeling_mamba.MambaMixer(cfg, layer_idx=0).eval()
    randomise(theirs)
    ours = SelectiveSSM(
        cfg.hidden_size,
        d_state=cfg.state_size,
        d_conv=cfg.conv_kernel,
        expand=cfg.expand,
        dt_rank=cfg.time_step_rank,
        conv_bias=cfg.use_conv_bias,
        bias=cfg.use_bias,
    )
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 19, cfg.hidden_size)
    with torch.no_grad():
        expected = theirs(x)
        assert_close(ours(x), expected, 1e-5, "forward")
        state = ours.init_state(2)
        steps = torch.cat([ours(x[:, :7], state=state), *[ours(x[:, t : t + 1], state=state) for t in range(7, 19)]], 1)
    assert_close(steps, expected, 1e-5, "prefill then decode")


MAMBA2 = {
    "g1-p8-chunk4": dict(hidden_size=16, num_heads=4, head_dim=8, n_groups=1, state_size=8, chunk_size=4),
    "g2-p12-chunk5": dict(hidden_size=24, num_heads=4, head_dim=12, n_groups=2, state_size=16, chunk_size=5),
    "g4-p4-chunk8-limit": dict(
        hidden_size=32, num_heads=16, head_dim=4, n_groups=4, state_size=4, chunk_size=8, time_step_limit=(0.05, 0.4)
    ),
    "g2-p16-bias": dict(
        hidden_size=32, num_heads=4, head_dim=16, n_groups=2, state_size=8, chunk_size=16, use_bias=True
    ),
}


@pytest.mark.parametrize("name", MAMBA2)
def test_ssd_matches_mamba2_mixer(name):
    cfg = tf.Mamba2Config(num_hidden_layers=1, expand=2, **MAMBA2[name])
    theirs = tf.models.mamba2.modeling_mamba2.Mamba2Mixer(cfg, layer_idx=0).eval()
    randomise(theirs)
    ours = SSD(
        cfg.hidden_size,
        d_state=cfg.state_size,
        d_conv=cfg.conv_kernel,
        expand=cfg.expand,
        head_dim=cfg.head_dim,
        n_groups=cfg.n_groups,
        chunk_size=cfg.chunk_size,
        dt_limit=tuple(cfg.time_step_limit),
        norm_eps=cfg.layer_norm_epsilon,
        conv_bias=cfg.use_conv_bias,
        bias=cfg.use_bias,
    )
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 21, cfg.hidden_size)
    with torch.no_grad():
        expected = theirs(x)
        assert_close(ours(x), expected, 1e-5, "forward")
        state = ours.init_state(2)
        steps = torch.cat([ours(x[:, :9], state=state), *[ours(x[:, t : t + 1], state=state) for t in range(9, 21)]], 1)
    assert_close(steps, expected, 1e-5, "prefill then decode")
