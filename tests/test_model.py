"""CausalLM built from a recipe with every mixer kind: state protocol at model level, loss, ModelState."""

import pytest
import torch
import torch.nn.functional as F

from ssmblocks import KVCache, SSMState
from ssmblocks.model import CausalLM, build
from ssmblocks.recipe import Recipe
from tests.helpers import assert_close

VOCAB = 97


def hybrid(tie: bool = True, mlp: bool = True) -> CausalLM:
    """SelectiveSSM, SSD (2 groups), GQA attention and a parallel SSD+attention block in one model."""
    recipe = Recipe.model_validate(
        {
            "name": "all-kinds",
            "vocab_size": VOCAB,
            "pad_vocab_size_multiple": 8,
            "d_model": 32,
            "n_layers": 5,
            "tie_embeddings": tie,
            "mixers": {
                "s": {"kind": "selective_ssm", "d_state": 8},
                "m": {"kind": "ssd", "d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 4},
                "a": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "rotary_fraction": 0.5},
                "p": {"kind": "parallel", "mixers": ["m", "a"]},
            },
            "mlp": {"hidden_dim": 48} if mlp else None,
            "pattern": "s m a p m",
        }
    )
    return build(recipe).eval()


@pytest.fixture
def model():
    return hybrid()


def ids(b=2, l=11):
    return torch.randint(0, VOCAB, (b, l))


def test_logits_shape_and_padded_vocab_sliced(model):
    assert model.embedding.weight.shape[0] == 104  # 97 padded to a multiple of 8
    assert model(ids()).logits.shape == (2, 11, VOCAB)


@torch.no_grad()
def test_prefill_then_decode_at_every_step_equals_full_forward(model):
    tokens = ids(l=14)
    full = model(tokens).logits
    state = model.init_state(2, 14)
    steps = [model(tokens[:, :5], state=state).logits]
    steps += [model(tokens[:, t : t + 1], state=state).logits for t in range(5, 14)]
    assert_close(torch.cat(steps, 1), full, 1e-5, "prefill + decode")


@torch.no_grad()
def test_chunked_prefill_equals_one_shot(model):
    tokens = ids(l=13)
    one, chunked = model.init_state(2), model.init_state(2)
    a = model(tokens, state=one).logits
    b = torch.cat([model(tokens[:, s : s + 4], state=chunked).logits for s in range(0, 13, 4)], 1)
    assert_close(b, a, 1e-5, "chunked prefill logits")
    nxt = ids(l=1)
    assert_close(model(nxt, state=chunked).logits, model(nxt, state=one).logits, 1e-5, "next step after prefill")


@torch.no_grad()
def test_clone_continues_identically_and_independently(model):
    state = model.init_state(2, 20)
    model(ids(l=6), state=state)
    fork = state.clone()
    cont = ids(l=3)
    a = model(cont, state=state).logits
    b = model(cont, state=fork).logits
    assert_close(b, a, 1e-6, "clone continues like the original")
    # the fork is independent: advancing it does not touch the original
    before = state.clone()
    model(ids(l=2), state=fork)
    for x, y in zip(state.layers, before.layers, strict=True):
        for field in ("ssm", "k"):
            if hasattr(x, field):
                assert torch.equal(getattr(x, field), getattr(y, field))


@torch.no_grad()
def test_select_reorders_and_drops_rows(model):
    tokens = ids(b=3, l=7)
    state = model.init_state(3, 12)
    model(tokens, state=state)
    picked = state.select([2, 0])
    nxt = ids(b=3, l=1)
    full = model(nxt, state=state).logits
    sub = model(nxt[[2, 0]], state=picked).logits
    assert_close(sub, full[[2, 0]], 1e-6, "selected rows continue as in the full batch")
    with pytest.raises(ValueError, match="row index out of range"):
        state.select([5])


def test_state_to_casts_activation_buffers_only(model):
    state = model.init_state(2, 8).to(dtype=torch.bfloat16)
    kinds = {type(s) for s in state.layers}
    assert SSMState in kinds and KVCache in kinds
    for s in state.layers:
        if isinstance(s, SSMState):
            assert s.conv.dtype == torch.bfloat16 and s.ssm.dtype == torch.float32
        if isinstance(s, KVCache):
            assert s.k.dtype == torch.bfloat16 and s.valid.dtype == torch.bool and s.cursor.dtype == torch.long


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(model):
    tokens = ids(l=9)
    labels = tokens.clone()
    labels[0, 3] = -100
    labels[1, :4] = -100
    out = model(tokens, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(out.loss, manual, 1e-6, "loss")
    out.loss.backward()
    assert model.embedding.weight.grad is not None


def test_packed_loss_does_not_predict_across_boundaries(model):
    a, b = ids(b=1, l=5), ids(b=1, l=4)
    packed = torch.cat([a, b], 1)
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    out = model(packed, cu_seqlens=cu, labels=packed)
    la, lb = model(a, labels=a), model(b, labels=b)
    expected = (la.loss * 4 + lb.loss * 3) / 7  # 4 + 3 predicted positions
    assert_close(out.loss, expected, 1e-5, "packed loss")
    assert_close(out.logits, torch.cat([la.logits, lb.logits], 1), 1e-5, "packed logits")


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings(tie):
    model = hybrid(tie=tie)
    assert (model.lm_head.weight is model.embedding.weight) == tie


def test_bad_token_ids_and_state(model):
    with pytest.raises(ValueError, match="token id 97 is out of range for vocab_size=97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seqlen\)"):
        model(torch.tensor([1, 2]))


def test_residual_stream_in_float32_with_bf16_weights():
    model = build(hybrid().recipe, dtype=torch.bfloat16)
    out = model(ids())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert model.layers[0].mixer.A_log.dtype == torch.float32
