"""torch.compile of a whole model trains (forward and backward) with the torch paths, in one graph."""

import pytest
import torch

import ssmblocks
from tests.helpers import assert_close

RECIPE = ssmblocks.Recipe(
    name="compile-me",
    vocab_size=64,
    d_model=32,
    n_layers=3,
    mixers={
        "s": {"kind": "selective_ssm", "d_state": 4},
        "m": {"kind": "ssd", "d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 4},
        "a": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
    },
    mlp={"hidden_dim": 48},
    pattern="s m a",
)


def loss_and_grads(run, model, ids):
    """Loss and gradients of ``run`` (the model, or the compiled model sharing its parameters)."""
    model.zero_grad()
    loss = run(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_compiled_model_trains_like_eager_without_graph_breaks():
    torch.manual_seed(0)
    model = ssmblocks.build(RECIPE).train()
    ids = torch.randint(0, 64, (2, 11))
    explanation = torch._dynamo.explain(model)(ids, labels=ids)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    eager_loss, eager_grads = loss_and_grads(model, model, ids)
    loss, grads = loss_and_grads(torch.compile(model, fullgraph=True), model, ids)
    assert_close(loss, eager_loss, 1e-5, "loss")
    for name, grad in eager_grads.items():
        assert_close(grads[name], grad, 1e-4, name)
