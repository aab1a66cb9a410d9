"""mamba_ssm's original checkpoints (state-spaces/mamba-*, state-spaces/mamba2-*: backbone.embedding, padded
vocab, tied embeddings, pytorch_model.bin), written by the test from a transformers model's weights, load
and give that model's logits on the real vocabulary."""

from __future__ import annotations

import pytest
import torch

import ssmblocks
from tests.checkpoints.builders import (
    VOCAB,
    full_logits,
    hf_logits,
    hf_model,
    make_ids,
    original_config,
    step_logits,
    to_mamba_ssm,
    write_original,
)
from tests.helpers import assert_close

pytest.importorskip("transformers")

TOL = 1e-4


def _padded(multiple: int) -> int:
    return -(-VOCAB // multiple) * multiple


MAMBA1 = {  # (HF config, ssm_cfg written to config.json, pad_vocab_size_multiple, tie_embeddings)
    "empty-ssm_cfg-pad8-tied": (dict(hidden_size=32, num_hidden_layers=2, state_size=8), {}, 8, True),
    "explicit-ssm_cfg-pad16-tied": (
        dict(hidden_size=24, num_hidden_layers=3, state_size=4, conv_kernel=3),
        {"d_state": 4, "d_conv": 3, "expand": 2},
        16,
        True,
    ),
    "pad8-untied": (dict(hidden_size=16, num_hidden_layers=2, state_size=16), {}, 8, False),
}


@pytest.mark.parametrize("hf_config, ssm_cfg, multiple, tie", MAMBA1.values(), ids=MAMBA1.keys())
def test_original_mamba1(tmp_path, hf_config, ssm_cfg, multiple, tie):
    # mamba_ssm's Mamba1 has no in_proj/out_proj bias and a conv bias
    hf = hf_model(
        "mamba", vocab_size=_padded(multiple), use_bias=False, use_conv_bias=True, tie_word_embeddings=tie, **hf_config
    )
    state = to_mamba_ssm(hf.state_dict())
    assert state["backbone.embedding.weight"].shape[0] == _padded(multiple) > VOCAB
    assert torch.equal(state["lm_head.weight"], state["backbone.embedding.weight"]) == tie
    config = original_config(hf_config["hidden_size"], hf_config["num_hidden_layers"], ssm_cfg, multiple, tie)
    folder = write_original(tmp_path / "mamba-tiny", state, config)

    model = ssmblocks.from_pretrained(folder)
    assert model.recipe.vocab_size == VOCAB and model.recipe.padded_vocab_size == _padded(multiple)
    assert {model.recipe.mixers[name].kind for name in model.recipe.layers} == {"selective_ssm"}
    assert (model.lm_head.weight is model.embedding.weight) == tie
    ids = make_ids()
    expected = hf_logits(hf, ids)[..., :VOCAB]
    assert_close(full_logits(model, ids), expected, TOL, "original Mamba1")
    assert_close(step_logits(model, ids), expected, TOL, "original Mamba1, decode")


G, N, P = 2, 8, 8  # ngroups, d_state, headdim of the Mamba2 checkpoints below
MAMBA2_HF = dict(hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=P, n_groups=G, state_size=N, chunk_size=8)
MAMBA2 = {
    "layer-Mamba2": {"layer": "Mamba2", "ngroups": G, "d_state": N, "headdim": P},
    "no-layer-key": {"ngroups": G, "d_state": N, "headdim": P},  # the tensor names say Mamba2
    "chunk_size-5": {"layer": "Mamba2", "ngroups": G, "chunk_size": 5},
}


@pytest.mark.parametrize("ssm_cfg", MAMBA2.values(), ids=MAMBA2.keys())
def test_original_mamba2(tmp_path, ssm_cfg):
    multiple = 16
    # mamba_ssm's Mamba2 defaults: no projection bias, conv bias, tied embeddings
    hf = hf_model("mamba2", vocab_size=_padded(multiple), use_bias=False, tie_word_embeddings=True, **MAMBA2_HF)
    state = to_mamba_ssm(hf.state_dict())
    folder = write_original(tmp_path / "mamba2-tiny", state, original_config(32, 2, ssm_cfg, multiple))

    model = ssmblocks.from_pretrained(folder)
    assert model.recipe.padded_vocab_size == _padded(multiple) == 112
    spec = model.recipe.mixers[model.recipe.layers[0]]
    assert (spec.kind, spec.n_groups, spec.d_state, spec.head_dim) == ("ssd", G, N, P)
    ids = make_ids()
    expected = hf_logits(hf, ids)[..., :VOCAB]
    assert_close(full_logits(model, ids), expected, TOL, "original Mamba2")
    assert_close(step_logits(model, ids), expected, TOL, "original Mamba2, decode")


def test_original_mamba2_with_D_per_channel(tmp_path):
    """D_has_hdim=True stores D per channel [d_inner]; repeating each head's D over its channels must give the
    same model."""
    hf = hf_model("mamba2", vocab_size=_padded(16), tie_word_embeddings=True, **MAMBA2_HF)
    state = to_mamba_ssm(hf.state_dict())
    for key in [k for k in state if k.endswith("mixer.D")]:
        state[key] = state[key].repeat_interleave(P)
    ssm_cfg = {"layer": "Mamba2", "ngroups": G, "D_has_hdim": True}
    folder = write_original(tmp_path / "mamba2-dhdim", state, original_config(32, 2, ssm_cfg, 16))
    model = ssmblocks.from_pretrained(folder)
    assert model.recipe.mixers[model.recipe.layers[0]].D_has_hdim
    ids = make_ids()
    assert_close(full_logits(model, ids), hf_logits(hf, ids)[..., :VOCAB], TOL, "original Mamba2, D per channel")


def test_original_checkpoint_in_safetensors(tmp_path):
    """The same layout in model.safetensors (some converted repos) loads the same way."""
    from safetensors.torch import save_file

    hf = hf_model("mamba", vocab_size=_padded(8), use_bias=False, hidden_size=32, num_hidden_layers=2, state_size=8)
    state = to_mamba_ssm(hf.state_dict())
    del state["lm_head.weight"]  # tied: safetensors cannot store shared tensors, so the head is left out
    folder = write_original(tmp_path / "st", {}, original_config(32, 2, {}, 8))
    (folder / "pytorch_model.bin").unlink()
    save_file(state, str(folder / "model.safetensors"))
    ids = make_ids()
    assert_close(full_logits(ssmblocks.from_pretrained(folder), ids), hf_logits(hf, ids)[..., :VOCAB], TOL, "st")


def test_sharded_bin_with_index(tmp_path):
    """pytorch_model-0000k-of-0000n.bin shards with pytorch_model.bin.index.json (older HF repos)."""
    import json

    hf = hf_model("mamba", hidden_size=32, num_hidden_layers=2, state_size=8, tie_word_embeddings=False)
    hf.config.save_pretrained(tmp_path)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, tmp_path / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = make_ids()
    assert_close(full_logits(ssmblocks.from_pretrained(tmp_path), ids), hf_logits(hf, ids), TOL, "bin shards")
