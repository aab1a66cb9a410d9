"""Bad inputs at the model, generation, state and training entry points are errors that name what is wrong,
not raw torch messages: empty batches and sequences, ids of the wrong type, labels of the wrong shape,
non-integer or out-of-range generation and sampling arguments, negative state rows, bad clip norms."""

from __future__ import annotations

import math

import pytest
import torch

import ssmblocks
from ssmblocks import ShapeError, StateError
from ssmblocks.generation import sample_next
from ssmblocks.training import clip_grad_norm_

RECIPE = """
name: tiny
vocab_size: 97
d_model: 32
n_layers: 3
mixers:
  m: {kind: ssd, d_state: 8, head_dim: 8, chunk_size: 8}
  s: {kind: selective_ssm, d_state: 4}
  a: {kind: attention, n_heads: 4}
pattern: m s a
"""


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ssmblocks.build(ssmblocks.Recipe.from_yaml(RECIPE)).eval()


def _ids(b=2, l=5):
    return torch.randint(0, 97, (b, l))


# --- model entry ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, error, match",
    [
        (torch.zeros(0, 5, dtype=torch.long), ShapeError, r"empty batch \(input_ids of shape \(0, 5\)\)"),
        (torch.zeros(2, 0, dtype=torch.long), ShapeError, r"empty sequence \(seqlen 0"),
        ([[1, 2, 3]], TypeError, "input_ids must be a torch.Tensor of token ids .* got list"),
        (torch.ones(1, 3, dtype=torch.bool), TypeError, "integer token ids .* got torch.bool"),
        (torch.ones(1, 3, dtype=torch.uint8), TypeError, "integer token ids .* got torch.uint8"),
        (torch.ones(1, 3, dtype=torch.int16), TypeError, "integer token ids .* got torch.int16"),
        (torch.ones(1, 3), TypeError, "integer token ids .* got torch.float32"),
    ],
    ids=["empty-batch", "zero-length", "list", "bool", "uint8", "int16", "float"],
)
def test_bad_input_ids(model, ids, error, match):
    with pytest.raises(error, match=match):
        model(ids)


def test_int32_ids_are_accepted(model):
    ids = _ids()
    assert torch.equal(model(ids.int()).logits, model(ids).logits)


@pytest.mark.parametrize(
    "labels, error, match",
    [
        (
            torch.zeros(2, 4, dtype=torch.long),
            ShapeError,
            r"labels must have the input's shape .* \(2, 5\), got \(2, 4\)",
        ),
        (torch.zeros(10, dtype=torch.long), ShapeError, r"got \(10,\)"),
        (torch.zeros(2, 5), TypeError, "labels must be integer token ids .* got torch.float32"),
        (torch.zeros(2, 5, dtype=torch.bool), TypeError, "got torch.bool"),
        ([[0] * 5] * 2, TypeError, "labels must be a torch.Tensor"),
    ],
    ids=["short", "flat", "float", "bool", "list"],
)
def test_bad_labels(model, labels, error, match):
    with pytest.raises(error, match=match):
        model(_ids(), labels=labels)


# --- generation -----------------------------------------------------------------------------------------------


BAD_GENERATION = [
    ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an int, got float 2.5"),
    ({"max_new_tokens": "4"}, TypeError, "max_new_tokens must be an int, got str '4'"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an int, got bool"),
    ({"prefill_chunk_size": 2.0}, TypeError, "prefill_chunk_size must be an int"),
    ({"do_sample": True, "top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"do_sample": True, "top_p": -0.5}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"do_sample": True, "top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"do_sample": True, "temperature": math.nan}, ValueError, "temperature must be a number >= 0.*nan"),
    ({"do_sample": True, "temperature": -1.0}, ValueError, "temperature must be a number >= 0"),
    ({"do_sample": True, "top_k": -3}, ValueError, "top_k must be an integer >= 0"),
    ({"do_sample": True, "top_k": 2.5}, ValueError, "top_k must be an integer >= 0"),
]


@pytest.mark.parametrize(
    "kwargs, error, match",
    BAD_GENERATION,
    ids=["-".join(f"{k}={v}" for k, v in kwargs.items()) for kwargs, _, _ in BAD_GENERATION],
)
def test_bad_generation_arguments(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(_ids(1, 3), **kwargs)


@pytest.mark.parametrize(
    "ids, error, match",
    [
        ([[1, 2]], TypeError, "input_ids must be a torch.Tensor"),
        (torch.zeros(0, 3, dtype=torch.long), ShapeError, "batch, seqlen >= 1"),
    ],
    ids=["list", "empty-batch"],
)
def test_bad_generation_input(model, ids, error, match):
    with pytest.raises(error, match=match):
        ssmblocks.generate(model, ids, max_new_tokens=2)


def test_sample_next_checks_its_arguments():
    logits = torch.randn(2, 11)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, do_sample=True, top_p=0)
    assert sample_next(logits, do_sample=True, temperature=0, top_p=1).shape == (2,)  # 0 = greedy
    assert torch.equal(sample_next(logits, top_p=0), logits.argmax(-1)), "greedy ignores the sampling arguments"


# --- state ----------------------------------------------------------------------------------------------------


def _state(model):
    state = model.init_state(3, 16)
    model(torch.randint(0, 97, (3, 4)), state=state)
    return state


def test_select_with_negative_indices_counts_from_the_end(model):
    state = _state(model)
    picked, explicit = state.select([-1, 0]), state.select([2, 0])
    for a, b in zip(picked.layers, explicit.layers, strict=True):
        for name in a.__dataclass_fields__:
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize(
    "indices, match",
    [
        ([3], "row index out of range for batch size 3: 3"),
        ([-4], "row index out of range for batch size 3: -4"),
        ([0.5], "integer row indices, got torch.float32"),
        ([True, False], "integer row indices, got torch.bool"),
        ([[0, 1]], r"1-d list or tensor .* shape \(1, 2\)"),
    ],
    ids=["past-end", "before-start", "float", "bool-mask", "2d"],
)
def test_select_with_bad_indices(model, indices, match):
    with pytest.raises(StateError, match=match):
        _state(model).select(indices)


# --- training -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.nan, math.inf, "1"])
def test_clip_grad_norm_refuses_bad_max_norm(max_norm):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="max_norm must be a positive finite number"):
        clip_grad_norm_([p], max_norm)
    assert torch.equal(p.grad, torch.ones(3)), "gradients untouched"


def test_clip_grad_norm_takes_one_tensor():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    total = clip_grad_norm_(p, 1.0)
    assert math.isclose(total.item(), 6.0, rel_tol=1e-6)
    assert math.isclose(torch.linalg.vector_norm(p.grad).item(), 1.0, rel_tol=1e-5)
