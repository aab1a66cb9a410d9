"""Decode plans (ssmblocks.backends.plans) against the plain forward with only torch implementations: the cpp
plan's one-call block steps and head, its fallbacks, and the plan a selection or a device gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ssmblocks
from ssmblocks import backends
from ssmblocks.backends import decode_plan
from ssmblocks.generation import generate
from tests.helpers import assert_close, randomise
from tests.test_model import hybrid

MIXERS = {  # one block each; every option the one-call steps read
    "mamba": {"kind": "selective_ssm", "d_state": 7, "dt_rank": 5, "bias": True},
    "mamba-no-conv-bias": {"kind": "selective_ssm", "d_state": 16, "d_conv": 3, "conv_bias": False},
    "ssd-groups": {
        "kind": "ssd", "d_state": 9, "head_dim": 12, "n_groups": 2, "D_has_hdim": True, "dt_limit": (0.02, 0.3),
        "bias": True,
    },
    "ssd-gate-first": {
        "kind": "ssd", "d_state": 20, "head_dim": 16, "norm_before_gate": True, "conv_bias": False, "d_conv": 2,
    },
}  # fmt: skip
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def one_dtype_model(mixers: dict, pattern: str, dtype: torch.dtype, mlp: bool = False) -> ssmblocks.CausalLM:
    """A model whose every tensor, residual stream and ssm states included, is in ``dtype`` (as the one-call
    steps need), with random weights on which every parameter matters."""
    torch.manual_seed(0)
    recipe = ssmblocks.Recipe.model_validate(
        {
            "name": "plan",
            "vocab_size": 50,
            "d_model": 48,
            "n_layers": len(pattern.split()),
            "mixers": mixers,
            "mlp": {"hidden_dim": 64} if mlp else None,
            "pattern": pattern,
            "residual_in_fp32": False,
            "norm": {"eps": 1e-3},
        }
    )
    model = ssmblocks.build(recipe).to(dtype).eval()  # .to promotes A_log, D and dt_bias too
    for block in model.layers:
        randomise(block)
        block.mixer.state_dtype = dtype
    return model


def decode(model, prompt, steps, plan: bool):
    """The prompt at once, then ``steps`` tokens through the plan or the forward. Returns (logits, state)."""
    state = model.init_state(prompt.shape[0])
    tokens = torch.randint(0, 50, (prompt.shape[0], steps), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = [model(prompt, state=state).logits[:, -1]]
        step = decode_plan(model, state) if plan else lambda t: model(t[:, None], state=state).logits[:, -1]
        out += [step(tokens[:, t]) for t in range(steps)]
    return torch.stack(out, dim=1), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mlp", [False, True], ids=["no_mlp", "mlp"])
@pytest.mark.parametrize("kind", MIXERS)
def test_cpp_plan_equals_the_torch_forward(kernel, kind, mlp, batch, dtype):
    model = one_dtype_model({"m": MIXERS[kind]}, "m m", dtype, mlp)
    prompt = torch.randint(0, 50, (batch, 3))
    with backends.record() as calls:
        logits, state = decode(model, prompt, 4, plan=True)
    step = "ssd_mixer_step" if MIXERS[kind]["kind"] == "ssd" else "selective_ssm_step"
    assert [op for op, _ in calls].count(step) == 2 * 4 and [op for op, _ in calls].count("norm_linear") == 4
    with backends.use("torch"):
        logits_ref, state_ref = decode(model, prompt, 4, plan=False)
    assert_close(logits, logits_ref, TOL[dtype], "logits")
    for i, (s, r) in enumerate(zip(state.layers, state_ref.layers, strict=True)):
        assert_close(s.ssm, r.ssm, TOL[dtype], f"layer {i} ssm state")
        assert_close(s.conv, r.conv, TOL[dtype], f"layer {i} conv state")


def test_hybrid_generate_binds_ssm_blocks_and_runs_the_rest_through_forward(kernel):
    """Attention and parallel blocks run their forward; the tokens equal those of the torch implementations."""
    model = one_dtype_model(
        {
            "s": {"kind": "selective_ssm", "d_state": 8},
            "m": {"kind": "ssd", "d_state": 8, "head_dim": 8, "n_groups": 2},
            "a": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "rotary_fraction": 0.5},
            "p": {"kind": "parallel", "mixers": ["m", "a"]},
        },
        "s m a p m",
        torch.float32,
        mlp=True,
    )
    prompt = torch.randint(0, 50, (2, 7))
    with backends.record() as calls:
        out = generate(model, prompt, max_new_tokens=5)
    ops = [op for op, _ in calls]
    assert ops.count("selective_ssm_step") == 4 and ops.count("ssd_mixer_step") == 2 * 4, ops  # 4 decode steps
    with backends.use("torch"):
        assert torch.equal(generate(model, prompt, max_new_tokens=5), out)


class _Other(nn.Linear):
    """Stands for a module that replaces a projection (a PEFT adapter, say)."""


@pytest.mark.parametrize("case", ["replaced module", "hook", "state of another dtype"])
def test_a_block_it_cannot_honour_runs_its_forward(kernel, case):
    model = one_dtype_model({"m": MIXERS["mamba"]}, "m m", torch.float32)
    mixer, hooked = model.layers[1].mixer, []
    if case == "replaced module":
        old = mixer.x_proj
        mixer.x_proj = _Other(old.in_features, old.out_features, bias=False)
        mixer.x_proj.load_state_dict(old.state_dict())
    elif case == "hook":
        mixer.out_proj.register_forward_hook(lambda *args: hooked.append(1))
    else:
        mixer.state_dtype = torch.float64
    prompt = torch.randint(0, 50, (2, 3))
    with backends.record() as calls:
        logits, _ = decode(model, prompt, 3, plan=True)
    assert [op for op, _ in calls].count("selective_ssm_step") == 3  # block 0 only
    assert hooked == ([1] * 4 if case == "hook" else [])  # the prompt and 3 tokens
    with backends.use("torch"):
        logits_ref, _ = decode(model, prompt, 3, plan=False)
    assert_close(logits, logits_ref, TOL[torch.float32], "logits")


def test_plan_kinds(kernel):
    model = one_dtype_model({"m": MIXERS["ssd-groups"]}, "m", torch.float32)
    state = model.init_state(2)
    assert decode_plan(model, state).kind == "cpp"
    with backends.use("torch"):
        assert decode_plan(model, state).kind == "forward"
    assert decode_plan(hybrid(), hybrid().init_state(2)).kind == "cpp"  # float32 throughout
    attention = one_dtype_model({"a": {"kind": "attention", "n_heads": 4}}, "a", torch.float32)
    assert decode_plan(attention, attention.init_state(2)).kind == "forward"  # no block with a one-call step
    model = model.to(torch.bfloat16)  # the kernels take float32 and float64
    assert decode_plan(model, model.init_state(2)).kind == "forward"


def test_wrong_state_is_named_when_the_plan_is_made(kernel):
    model = one_dtype_model({"m": MIXERS["ssd-groups"]}, "m", torch.float32)
    state = model.init_state(2)
    state.layers[0].ssm = torch.zeros(2, 1, 1, 1)  # made for another layer
    with pytest.raises(ssmblocks.errors.StateError, match=r"state.ssm has shape \(2, 1, 1, 1\)"):
        decode_plan(model, state)


@pytest.mark.gpu
@pytest.mark.parametrize("selection", ["auto", "torch"])
def test_cuda_graph_plan_equals_the_forward(selection):
    mixers = {
        "s": MIXERS["mamba"],
        "m": MIXERS["ssd-groups"],
        "a": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
    }
    model = one_dtype_model(mixers, "s m a", torch.float32).cuda()
    prompt = torch.randint(0, 50, (3, 5), device="cuda")
    tokens = torch.randint(0, 50, (3, 4), device="cuda")
    results = []
    for graph in (True, False):
        state = model.init_state(3, 16)
        with backends.use(selection), torch.no_grad():
            model(prompt, state=state)
            plan = decode_plan(model, state, cuda_graph=graph)
            results.append(torch.stack([plan(tokens[:, t]).clone() for t in range(4)], dim=1))
        assert plan.kind == ("cuda_graph" if graph else "forward")
    assert_close(results[0], results[1], 1e-5, "logits")
