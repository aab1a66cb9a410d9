"""Decode's one-call C++ step (fused_call / fused_step of SelectiveSSM and SSD, Block.fused_call, generate's
CPU step) against the pure torch path: every C++ kernel switched off, the same layer, the same tokens."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import ssmblocks
from ssmblocks.generation import generate
from ssmblocks.layers import SSD, RMSNorm, SelectiveSSM
from tests.helpers import assert_close, randomise
from tests.test_model import VOCAB, hybrid

KERNEL_USERS = ["ssmblocks.ops.conv", "ssmblocks.ops.selective_scan", "ssmblocks.ops.linear"]
KERNEL_USERS += ["ssmblocks.layers._fused_step"]

LAYERS = {
    "mamba": lambda: SelectiveSSM(40, d_state=7, dt_rank=5, bias=True),
    "mamba-no-conv-bias": lambda: SelectiveSSM(24, d_state=16, d_conv=3, conv_bias=False),
    "ssd-groups": lambda: SSD(48, d_state=9, head_dim=12, n_groups=2, D_has_hdim=True, dt_limit=(0.02, 0.3), bias=True),
    "ssd-gate-first": lambda: SSD(32, d_state=20, head_dim=16, norm_before_gate=True, conv_bias=False, d_conv=2),
}
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def torch_only(monkeypatch):
    """Every C++ kernel off: the layers take their torch paths."""
    for name in KERNEL_USERS:
        monkeypatch.setattr(importlib.import_module(name), "cpu_ops", lambda: None)


def spy(monkeypatch, kernel) -> list[str]:
    """Record which C++ ops the one-call step runs (they still run)."""
    called = []

    class Spy:
        def __getattr__(self, name):
            called.append(name)
            return getattr(kernel, name)

    monkeypatch.setattr(importlib.import_module("ssmblocks.layers._fused_step"), "cpu_ops", lambda: Spy())
    return called


def layer_and_input(kind, dtype, batch, steps=5):
    torch.manual_seed(0)
    layer = LAYERS[kind]().to(dtype)  # .to promotes A_log, D and dt_bias too, which only bf16 and fp16 leave
    layer.state_dtype = dtype  # the one-call step wants the ssm state in the layer's dtype
    randomise(layer)
    return layer, torch.randn(batch, steps, layer.d_model, dtype=dtype)


def decode(layer, x, block_norm=None):
    """Token by token through a fresh state; with block_norm, as a pre-norm residual block. Returns y, state."""
    state = layer.init_state(x.shape[0])
    ys = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            xt = x[:, t : t + 1]
            if block_norm is None:
                ys.append(layer(xt, state))
            else:
                out = layer.fused_step(xt, state, block_norm)
                ys.append(xt + layer(block_norm(xt), state) if out is None else out)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("in_block", [False, True], ids=["layer", "block"])
def test_one_call_step_equals_torch_path(kernel, monkeypatch, kind, batch, dtype, in_block):
    layer, x = layer_and_input(kind, dtype, batch)
    block_norm = RMSNorm(layer.d_model, eps=1e-3).to(dtype) if in_block else None
    if block_norm is not None:
        randomise(block_norm)
    called = spy(monkeypatch, kernel)
    y, state = decode(layer, x, block_norm)
    assert called == [type(layer).__name__ == "SSD" and "ssd_mixer_step" or "selective_ssm_step"] * x.shape[1]
    torch_only(monkeypatch)
    y_ref, state_ref = decode(layer, x, block_norm)
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(state.ssm, state_ref.ssm, TOL[dtype], "ssm state")
    assert_close(state.conv, state_ref.conv, TOL[dtype], "conv state")


def ssm_model() -> ssmblocks.CausalLM:
    """A SelectiveSSM block and an SSD block (two groups), no MLP: every block can take the one-call step."""
    torch.manual_seed(0)
    mixers = {
        "s": {"kind": "selective_ssm", "d_state": 8},
        "m": {"kind": "ssd", "d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 4},
    }
    recipe = ssmblocks.Recipe.model_validate(
        {
            "name": "ssm",
            "vocab_size": 50,
            "d_model": 32,
            "n_layers": 3,
            "mixers": mixers,
            "pattern": "s m s",
            "residual_in_fp32": False,
        }
    )
    model = ssmblocks.build(recipe).double().eval()  # the residual stream in float64 too (one dtype throughout)
    for block in model.layers:
        randomise(block.mixer)
        block.mixer.state_dtype = torch.float64
    return model


def feed(model, prompt):
    """The prompt's first 3 tokens at once, then one token at a time. Returns (logits, state)."""
    state = model.init_state(prompt.shape[0])
    with torch.no_grad():
        logits = [model(prompt[:, :3], state=state).logits]
        logits += [model(prompt[:, t : t + 1], state=state).logits for t in range(3, prompt.shape[1])]
    return torch.cat(logits, dim=1), state


def test_model_and_generate_use_it_and_equal_the_torch_path(kernel, monkeypatch):
    """The model's one-token forward (through Block.forward) and generate's CPU step run the one-call step
    (generate also for the final norm and LM head); logits, tokens and the state's offset equal the torch
    path's."""
    model, prompt = ssm_model(), torch.randint(0, 50, (2, 6))
    with monkeypatch.context() as m:
        called = spy(m, kernel)
        logits, state = feed(model, prompt)
        assert len(called) == 3 * 3, called  # 3 blocks x 3 one-token calls
        out = generate(model, prompt, max_new_tokens=5)
        # + 3 blocks x 4 decode steps (the 5th token needs none), and the final norm + LM head once a step
        assert len(called) == 3 * 3 + 4 * (3 + 1) and called.count("norm_linear") == 4, called
    assert state.offset == 6
    with monkeypatch.context() as m:
        torch_only(m)
        logits_ref, state_ref = feed(model, prompt)
        assert torch.equal(generate(model, prompt, max_new_tokens=5), out)
    assert_close(logits, logits_ref, 1e-12, "logits")
    for i, (s, r) in enumerate(zip(state.layers, state_ref.layers, strict=True)):
        assert_close(s.ssm, r.ssm, 1e-12, f"layer {i} ssm state")
    residual = torch.randn(2, 1, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(model.fused_head_call(residual)(residual), model.head(residual), 1e-12, "head")
        assert model.fused_head_call(torch.randn(2, 3, 32, dtype=torch.float64)) is None  # one token only


def test_hybrid_generate_binds_ssm_blocks_and_runs_the_rest_through_forward(kernel, monkeypatch):
    """Blocks with an MLP take the one-call step for norm, mixer and residual, then their MLP; attention and
    parallel blocks run their forward (where an SSD mixer's own step is one call). Tokens equal the torch
    path's."""
    model, prompt = hybrid(), torch.randint(0, VOCAB, (2, 7))  # blocks: s m a p m, each with an MLP
    with monkeypatch.context() as m:
        called = spy(m, kernel)
        out = generate(model, prompt, max_new_tokens=5)
    # 4 decode steps: block s; blocks m in one call; the parallel block's SSD through its forward, one call too
    assert called.count("selective_ssm_step") == 4 and called.count("ssd_mixer_step") == 3 * 4, called
    with monkeypatch.context() as m:
        torch_only(m)
        assert torch.equal(generate(model, prompt, max_new_tokens=5), out)


class _Other(nn.Linear):
    """Stands for a module that replaces a projection (a PEFT adapter, say)."""


@pytest.mark.parametrize(
    "case", ["autograd", "bfloat16", "replaced module", "hook", "float64 state", "other device type"]
)
def test_falls_back_where_it_may_not_run(kernel, monkeypatch, case):
    """The one-call step declines (the layer's own path runs, with the same result) where it cannot honour the
    call: gradients, bf16, a module it does not know, a hook it would skip, a state of another dtype."""
    layer, x = layer_and_input("mamba", torch.bfloat16 if case == "bfloat16" else torch.float32, 2, steps=1)
    state = layer.init_state(2)
    hooked = []
    if case == "replaced module":
        old = layer.x_proj
        layer.x_proj = _Other(old.in_features, old.out_features, bias=False)
        layer.x_proj.load_state_dict(old.state_dict())
    elif case == "hook":
        layer.out_proj.register_forward_hook(lambda *args: hooked.append(1))
    elif case == "float64 state":
        state.ssm = state.ssm.double()
        layer.state_dtype = torch.float64
    elif case == "other device type":
        state = SimpleNamespace(conv=state.conv.to("meta"), ssm=state.ssm)
    called = spy(monkeypatch, kernel)
    if case == "other device type":
        assert layer.fused_call(x, state) is None
        return
    with torch.set_grad_enabled(case == "autograd"):
        y = layer(x, state)
    assert called == [], called
    assert hooked == ([1] if case == "hook" else [])
    assert y.shape == x.shape and torch.isfinite(y.float()).all()


def test_block_norm_path_checks_the_state(kernel):
    """Through a Block the layer's forward is bypassed: a state of the wrong batch still gets the StateError."""
    layer, x = layer_and_input("ssd-groups", torch.float32, 2, steps=1)
    with torch.no_grad(), pytest.raises(ssmblocks.errors.StateError, match="batch size"):
        layer.fused_step(x, layer.init_state(3), RMSNorm(layer.d_model))
