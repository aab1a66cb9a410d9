"""The bfloat16-on-CPU check and its warning."""

import warnings

import pytest
import torch

import ssmblocks
from ssmblocks import precision

TINY = ssmblocks.Recipe(
    name="tiny",
    vocab_size=64,
    d_model=32,
    n_layers=1,
    mixers={"m": {"kind": "ssd", "d_state": 8, "head_dim": 16}},
    pattern="m",
)


def test_detector_answers_a_bool_and_caches_it():
    first = precision.cpu_bf16_is_fast()
    assert isinstance(first, bool)
    assert precision.cpu_bf16_is_fast() is first


@pytest.mark.parametrize("fast", [False, True])
def test_build_in_bf16_warns_only_where_bf16_is_slow(monkeypatch, fast):
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: fast)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ssmblocks.build(TINY, dtype=torch.bfloat16)
        ssmblocks.build(TINY, dtype=torch.float32)
    messages = [str(w.message) for w in caught if "bfloat16" in str(w.message)]
    assert len(messages) == (0 if fast else 1)


def test_from_pretrained_in_bf16_warns_where_slow(monkeypatch, tmp_path):
    ssmblocks.save_pretrained(ssmblocks.build(TINY), tmp_path, format="ssmblocks")
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: False)
    with pytest.warns(UserWarning, match="use dtype=torch.float32 for speed"):
        model = ssmblocks.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.embedding.weight.dtype == torch.bfloat16
