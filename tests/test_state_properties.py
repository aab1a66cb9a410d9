"""Property-based tests (hypothesis) of the state protocol over random valid recipes: any mix of SSD,
SelectiveSSM and attention mixers, with or without an MLP. For every drawn model: one call == the same
sequence in random pieces == token by token; a packed batch == its sequences run separately; a left-padded
batch == each row alone. Examples are derandomised, so the suite sees the same cases every run."""

from __future__ import annotations

import pytest
import torch

import ssmblocks
from ssmblocks import Recipe
from tests.helpers import assert_close

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
SETTINGS = hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
TOL = 1e-4  # fp32 paths against the fp32 one-call forward


@st.composite
def mixer_specs(draw, kind: str, d_model: int) -> dict:
    if kind == "ssd":
        head_dim = draw(st.sampled_from([4, 8]))
        heads = 2 * d_model // head_dim
        return {
            "kind": "ssd",
            "d_state": draw(st.sampled_from([4, 8])),
            "d_conv": draw(st.sampled_from([2, 4])),
            "head_dim": head_dim,
            "n_groups": draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0])),
            "chunk_size": draw(st.sampled_from([3, 4, 8])),
        }
    if kind == "selective_ssm":
        return {"kind": kind, "d_state": draw(st.sampled_from([2, 4, 8])), "d_conv": draw(st.sampled_from([2, 3, 4]))}
    n_heads = draw(st.sampled_from([2, 4]))
    return {
        "kind": "attention",
        "n_heads": n_heads,
        "n_kv_heads": draw(st.sampled_from([h for h in (1, 2, 4) if n_heads % h == 0])),
        "rotary_fraction": draw(st.sampled_from([0.5, 1.0])),
    }


@st.composite
def recipes(draw) -> Recipe:
    d_model = draw(st.sampled_from([8, 16, 24]))
    kinds = draw(st.lists(st.sampled_from(["ssd", "selective_ssm", "attention"]), min_size=1, max_size=3))
    mixers = {name: draw(mixer_specs(kind, d_model)) for name, kind in zip("abc", kinds, strict=False)}
    layers = draw(st.lists(st.sampled_from(sorted(mixers)), min_size=1, max_size=3))
    mlp = draw(st.sampled_from([None, {"hidden_dim": 2 * d_model}]))
    data = {"name": "drawn", "vocab_size": 50, "d_model": d_model, "n_layers": len(layers), "mixers": mixers}
    return Recipe.model_validate({**data, "mlp": mlp, "pattern": layers})


def _model(recipe: Recipe, seed: int) -> ssmblocks.CausalLM:
    torch.manual_seed(seed)
    return ssmblocks.build(recipe).eval()


@SETTINGS
@hypothesis.given(recipe=recipes(), length=st.integers(1, 17), cuts=st.lists(st.integers(1, 6), max_size=4))
def test_one_call_equals_pieces_equals_token_by_token(recipe, length, cuts):
    model = _model(recipe, length)
    ids = torch.randint(0, recipe.vocab_size, (2, length))
    with torch.no_grad():
        whole = model(ids).logits
        pieces, state, start = [], model.init_state(2, length), 0
        for size in [*cuts, length]:
            if start < length:
                pieces.append(model(ids[:, start : start + size], state=state).logits)
                start += size
        stepped, state = [], model.init_state(2, length)
        for t in range(length):
            stepped.append(model(ids[:, t : t + 1], state=state).logits)
    assert_close(torch.cat(pieces, 1), whole, TOL, f"pieces {cuts}")
    assert_close(torch.cat(stepped, 1), whole, TOL, "token by token")
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


@SETTINGS
@hypothesis.given(recipe=recipes(), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3))
def test_packed_equals_separate(recipe, lengths):
    model = _model(recipe, sum(lengths))
    seqs = [torch.randint(0, recipe.vocab_size, (1, n)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs, 1), cu_seqlens=cu).logits
        separate = torch.cat([model(s).logits for s in seqs], 1)
    assert_close(packed, separate, TOL, f"packed {lengths}")


@SETTINGS
@hypothesis.given(recipe=recipes(), length=st.integers(1, 12), pads=st.lists(st.integers(0, 5), min_size=2, max_size=3))
def test_left_padded_equals_unpadded(recipe, length, pads):
    model = _model(recipe, length)
    width = length + max(pads)
    rows = [torch.randint(0, recipe.vocab_size, (1, width - pad)) for pad in pads]
    ids = torch.cat([torch.nn.functional.pad(r, (pad, 0)) for r, pad in zip(rows, pads, strict=True)])
    mask = torch.stack([torch.arange(width) >= pad for pad in pads]).long()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        for i, (row, pad) in enumerate(zip(rows, pads, strict=True)):
            assert_close(padded[i : i + 1, pad:], model(row).logits, TOL, f"row {i} (pad {pad})")
