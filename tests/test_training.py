"""Gradient checkpointing and optimizer parameter groups."""

import torch

import ssmblocks
from ssmblocks.training import clip_grad_norm_, param_groups
from tests.helpers import assert_close
from tests.test_model import VOCAB, hybrid


def grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    model = hybrid().train()
    ids = torch.randint(0, VOCAB, (2, 13))
    plain = grads(model, ids)
    model.gradient_checkpointing = True
    recomputed = grads(model, ids)
    assert plain.keys() == recomputed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        assert_close(recomputed[name], plain[name], 1e-5, name)


def test_param_groups_exempt_ssm_dynamics_norms_and_biases():
    model = hybrid()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert exempt.isdisjoint(decayed) and len(exempt) + len(decayed) == len(names)
    for name in names.values():
        leaf = name.rsplit(".", 1)[-1]
        ssm_or_bias = leaf in ("A_log", "D", "dt_bias", "bias")
        is_norm = ".norm" in name or name.startswith("norm_f") or ".norm2." in name
        assert (name in exempt) == (ssm_or_bias or is_norm), name
    torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)  # the groups are what AdamW takes


def test_param_groups_of_a_plain_layer():
    layer = ssmblocks.SSD(32, d_state=8, head_dim=16)
    decay, no_decay = param_groups(layer, 0.01)
    assert {id(p) for p in decay["params"]} == {
        id(layer.in_proj.weight),
        id(layer.out_proj.weight),
        id(layer.conv1d.weight),
    }


def test_bf16_autocast_trains_with_ssm_parameters_and_norms_in_float32():
    model = hybrid().train()
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    fp32_loss = model(ids, labels=ids).loss
    assert abs(out.loss.item() - fp32_loss.item()) < 0.05 * fp32_loss.item()
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name  # autocast computes in bf16, parameters stay float32
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def twin_models_with_gradients(seed: int):
    """Two hybrids with the same weights and the same gradients of one batch's loss."""
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
    ours, theirs = hybrid(), hybrid()
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        model(ids, labels=ids).loss.backward()
    return ours, theirs


def test_clip_grad_norm_matches_torch_on_a_plain_model():
    ours, theirs = twin_models_with_gradients(3)
    total = clip_grad_norm_(ours.parameters(), 0.5)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
    assert_close(total, expected, 1e-6)
    assert total > 0.5, "the test must clip"
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(p.grad, q.grad, 1e-5, name)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours.parameters()]))
    assert abs(clipped.item() - 0.5) < 1e-4


def test_clip_grad_norm_takes_a_module_as_its_parameters():
    ours, theirs = twin_models_with_gradients(4)
    assert_close(clip_grad_norm_(ours, 0.5), clip_grad_norm_(theirs.parameters(), 0.5), 1e-6)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert_close(p.grad, q.grad, 1e-6)
