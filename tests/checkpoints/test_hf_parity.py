"""transformers' Mamba / Mamba2 / Bamba checkpoints (save_pretrained of random tiny models) load into ssmblocks
and give transformers' logits, over a whole sequence and token by token through our state (float32, CPU)."""

from __future__ import annotations

import json

import pytest

import ssmblocks
from tests.checkpoints.builders import TINY_BAMBA, full_logits, hf_logits, hf_model, make_ids, save_hf, step_logits
from tests.helpers import assert_close

pytest.importorskip("transformers")

TOL = 1e-4

MAMBA = {
    "d32-n8-tied-bias": dict(
        hidden_size=32, num_hidden_layers=2, state_size=8, use_bias=True, use_conv_bias=True, tie_word_embeddings=True
    ),
    "d24-n4-k3-rank5-untied-nobias": dict(
        hidden_size=24,
        num_hidden_layers=3,
        state_size=4,
        conv_kernel=3,
        time_step_rank=5,
        layer_norm_epsilon=1e-3,
        use_bias=False,
        use_conv_bias=False,
        tie_word_embeddings=False,
    ),
    "d16-n16-expand3-convbias-only": dict(
        hidden_size=16, num_hidden_layers=2, state_size=16, expand=3, use_bias=False, use_conv_bias=True
    ),
}

MAMBA2 = {  # n_groups > 1 with several heads per group; chunks shorter than the sequence
    "d32-h8p8-g2-n8-chunk8-untied": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=8,
        head_dim=8,
        n_groups=2,
        state_size=8,
        chunk_size=8,
        tie_word_embeddings=False,
    ),
    "d64-h8p16-g4-n16-chunk4-tied-bias-noconvbias-dtlimit": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=8,
        head_dim=16,
        n_groups=4,
        state_size=16,
        chunk_size=4,
        conv_kernel=3,
        use_bias=True,
        use_conv_bias=False,
        time_step_limit=(0.05, 0.3),
        tie_word_embeddings=True,
    ),
    "d48-expand1-h4p12-g2-n4-chunk5": dict(
        hidden_size=48,
        num_hidden_layers=3,
        expand=1,
        num_heads=4,
        head_dim=12,
        n_groups=2,
        state_size=4,
        chunk_size=5,
        layer_norm_epsilon=1e-3,
        tie_word_embeddings=False,
    ),
}

BAMBA = {  # attention at some layers with GQA; SSD with n_groups > 1
    "d32-L3-attn1-gqa4to2-g2-n8": TINY_BAMBA,
    "d64-L4-attn0,2-gqa4to1-g4-tied-biases-dtlimit": dict(
        hidden_size=64,
        num_hidden_layers=4,
        attn_layer_indices=[0, 2],
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=40,
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_n_groups=4,
        mamba_d_state=16,
        mamba_d_conv=3,
        mamba_chunk_size=4,
        mamba_conv_bias=False,
        mamba_proj_bias=True,
        attention_bias=True,
        mlp_bias=True,
        rms_norm_eps=1e-3,
        time_step_limit=(0.05, 0.3),
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=True,
    ),
    "d32-L4-attn3-gqa8to2-g2-n4-chunk6": dict(
        hidden_size=32,
        num_hidden_layers=4,
        attn_layer_indices=[3],
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_n_groups=2,
        mamba_d_state=4,
        mamba_chunk_size=6,
    ),
}

CASES = [
    pytest.param(family, config, id=f"{family}-{name}")
    for family, table in (("mamba", MAMBA), ("mamba2", MAMBA2), ("bamba", BAMBA))
    for name, config in table.items()
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved transformers checkpoint per case, with the transformers model's logits on the same ids."""
    made = {}

    def get(family, config):
        key = (family, json.dumps(config, sort_keys=True))
        if key not in made:
            folder = tmp_path_factory.mktemp(family)
            hf = hf_model(family, **config)
            save_hf(hf, folder)
            ids = make_ids()
            made[key] = folder, ids, hf_logits(hf, ids)
        return made[key]

    return get


@pytest.mark.parametrize("family, config", CASES)
def test_full_forward_matches_transformers(checkpoints, family, config):
    folder, ids, expected = checkpoints(family, config)
    model = ssmblocks.from_pretrained(folder)
    assert_close(full_logits(model, ids), expected, TOL, f"{family} full forward")


@pytest.mark.parametrize("family, config", CASES)
def test_token_by_token_decode_matches_transformers(checkpoints, family, config):
    folder, ids, expected = checkpoints(family, config)
    model = ssmblocks.from_pretrained(folder)
    assert_close(step_logits(model, ids), expected, TOL, f"{family} decode through the state")


@pytest.mark.parametrize("family, config", CASES)
def test_recipe_reflects_the_config(checkpoints, family, config):
    folder, _, _ = checkpoints(family, config)
    recipe = ssmblocks.from_pretrained(folder).recipe
    assert recipe.d_model == config["hidden_size"]
    assert recipe.n_layers == config["num_hidden_layers"]
    assert recipe.tie_embeddings == config.get("tie_word_embeddings", family == "mamba")
    kinds = [recipe.mixers[name].kind for name in recipe.layers]
    if family == "mamba":
        assert kinds == ["selective_ssm"] * config["num_hidden_layers"]
    elif family == "mamba2":
        assert kinds == ["ssd"] * config["num_hidden_layers"]
        spec = recipe.mixers[recipe.layers[0]]
        assert (spec.n_groups, spec.head_dim, spec.d_state) == (
            config["n_groups"],
            config["head_dim"],
            config["state_size"],
        )
    else:
        attn = [i for i, kind in enumerate(kinds) if kind == "attention"]
        assert attn == config["attn_layer_indices"]
        assert recipe.mlp is not None and recipe.mlp.hidden_dim == config["intermediate_size"]


SHARDED = [
    pytest.param("mamba", MAMBA["d32-n8-tied-bias"], id="mamba"),
    pytest.param("mamba2", MAMBA2["d32-h8p8-g2-n8-chunk8-untied"], id="mamba2"),
    pytest.param("bamba", BAMBA["d32-L3-attn1-gqa4to2-g2-n8"], id="bamba"),
]


@pytest.mark.parametrize("family, config", SHARDED)
def test_sharded_safetensors_with_index(tmp_path, family, config):
    hf = hf_model(family, **config)
    save_hf(hf, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / name).is_file() for name in shards)
    assert not (tmp_path / "model.safetensors").exists()
    ids = make_ids()
    model = ssmblocks.from_pretrained(tmp_path)
    assert_close(full_logits(model, ids), hf_logits(hf, ids), TOL, f"{family} sharded")


@pytest.mark.parametrize("family", ["mamba", "mamba2", "bamba"])
def test_dtype_casts_weights_but_keeps_ssm_parameters_float32(checkpoints, family):
    import torch

    config = {"mamba": MAMBA, "mamba2": MAMBA2, "bamba": BAMBA}[family]
    folder, ids, expected = checkpoints(family, next(iter(config.values())))
    model = ssmblocks.from_pretrained(folder, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        want = torch.float32 if leaf in ("A_log", "D", "dt_bias") else torch.bfloat16
        assert p.dtype == want, name
    assert_close(full_logits(model, ids).float(), expected, 0.1, f"{family} bfloat16")


# Config fields that change transformers' model. The loader must honour them or refuse the checkpoint with a
# CheckpointError; loading a different model without a word is never right.
BAMBA_BASE = BAMBA["d32-L3-attn1-gqa4to2-g2-n8"]
HONOUR_OR_REFUSE = [
    pytest.param(
        "mamba",
        dict(MAMBA["d32-n8-tied-bias"], hidden_act="gelu"),
        id="mamba-hidden_act-gelu",
    ),
    pytest.param(
        "mamba2",
        dict(MAMBA2["d32-h8p8-g2-n8-chunk8-untied"], hidden_act="gelu"),
        id="mamba2-hidden_act-gelu",
    ),
    pytest.param(
        "bamba",
        dict(BAMBA_BASE, hidden_act="gelu"),
        id="bamba-hidden_act-gelu",
    ),
    pytest.param(
        "bamba",
        dict(BAMBA_BASE, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        id="bamba-rope-linear-scaling",
    ),
    pytest.param(
        "bamba",
        dict(BAMBA_BASE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}),
        id="bamba-partial_rotary_factor-1.0",
    ),
]


@pytest.mark.parametrize("family, config", HONOUR_OR_REFUSE)
def test_config_fields_are_honoured_or_refused(checkpoints, family, config):
    folder, ids, expected = checkpoints(family, config)
    try:
        model = ssmblocks.from_pretrained(folder)
    except ssmblocks.CheckpointError:
        return  # refused, with a message: fine
    assert_close(full_logits(model, ids), expected, TOL, f"{family} with {config}")
