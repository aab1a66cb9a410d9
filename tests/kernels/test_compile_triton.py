"""torch.compile(model, fullgraph=True) of a model whose ops run the Triton kernels (the "triton" selection):
one graph, and the loss and every gradient of eager, for a batch and for packed sequences (cu_seqlens).

On a machine without CUDA the kernels run in Triton's interpreter (conftest.py), so the model stays tiny.
"""

import pytest
import torch

import ssmblocks
from ssmblocks import backends
from tests.helpers import assert_close

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RECIPE = ssmblocks.Recipe(
    name="compile-the-kernels",
    vocab_size=64,
    d_model=32,
    n_layers=2,
    mixers={
        "s": {"kind": "selective_ssm", "d_state": 4},
        "m": {"kind": "ssd", "d_state": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 16},
    },
    mlp={"hidden_dim": 48},
    pattern="s m",
)


def loss_and_grads(run, model, ids, **kwargs):
    model.zero_grad()
    loss = run(ids, labels=ids, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_compiled_model_on_the_kernels_trains_like_eager_in_one_graph(packed):
    torch.manual_seed(0)
    model = ssmblocks.build(RECIPE).to(DEVICE).train()
    if packed:
        ids = torch.randint(0, 64, (1, 29), device=DEVICE)
        kwargs = {"cu_seqlens": torch.tensor([0, 11, 12, 29], dtype=torch.int32, device=DEVICE)}
    else:
        ids, kwargs = torch.randint(0, 64, (2, 19), device=DEVICE), {}
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break raises
    with backends.use("triton"), backends.record() as calls:
        eager_loss, eager_grads = loss_and_grads(model, model, ids, **kwargs)
        loss, grads = loss_and_grads(compiled, model, ids, **kwargs)
        if packed:  # the graph asserts what eager checks on the host
            with pytest.raises(RuntimeError, match="cu_seqlens must run from 0 to 29, strictly increasing"):
                compiled(ids, cu_seqlens=torch.tensor([0, 11, 11, 29], dtype=torch.int32, device=DEVICE))
    assert {("selective_scan", "triton"), ("ssd_scan", "triton"), ("causal_conv1d", "triton")} <= set(calls)
    assert_close(loss, eager_loss, 1e-5, "loss")
    for name, grad in eager_grads.items():
        assert_close(grads[name], grad, 1e-4, name)
