"""Round trips: ssmblocks -> save_pretrained(format="hf") -> transformers loads it (no missing or unexpected
keys) with the same logits; any recipe -> format="ssmblocks" -> from_pretrained; tokenizer.json kept; hub ids
go through huggingface_hub.snapshot_download."""

from __future__ import annotations

import fnmatch
import json

import pytest
import torch

import ssmblocks
from tests.checkpoints.builders import (
    TINY_BAMBA,
    VOCAB,
    full_logits,
    hf_logits,
    hf_model,
    make_ids,
    rerandomise,
    save_hf,
    step_logits,
    tiny_tokenizer,
)
from tests.helpers import assert_close

TOL = 1e-4

HF_SOURCES = {
    "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=8, use_bias=True, tie_word_embeddings=False),
    "mamba2": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=8,
        head_dim=8,
        n_groups=2,
        state_size=8,
        chunk_size=8,
        time_step_limit=(0.05, 0.3),
    ),
    "bamba": TINY_BAMBA,
}

RECIPES = {
    "mamba": """
name: tiny-mamba
vocab_size: 97
pad_vocab_size_multiple: 8
d_model: 32
n_layers: 2
mixers:
  m: {kind: selective_ssm, d_state: 8, d_conv: 3, bias: true}
pattern: m m
""",
    "mamba2": """
name: tiny-mamba2
vocab_size: 97
d_model: 32
n_layers: 3
tie_embeddings: false
mixers:
  m: {kind: ssd, d_state: 8, head_dim: 8, n_groups: 4, chunk_size: 5, dt_limit: [0.05, 0.3], conv_bias: false}
pattern: m*3
""",
    "bamba": """
name: tiny-bamba
vocab_size: 97
d_model: 32
n_layers: 4
tie_embeddings: false
residual_in_fp32: false
mixers:
  m: {kind: ssd, d_state: 8, head_dim: 16, n_groups: 2, chunk_size: 8}
  a: {kind: attention, n_heads: 4, n_kv_heads: 2, rotary_fraction: 0.5, rope_theta: 1000.0}
mlp: {hidden_dim: 48}
pattern: {default: m, at: {1: a, 3: a}}
""",
}


def _transformers_load(folder):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reports {problems}"
    return model.eval()


@pytest.mark.parametrize("family", HF_SOURCES)
def test_hf_checkpoint_saves_back_to_the_same_hf_checkpoint(tmp_path, family):
    pytest.importorskip("transformers")
    hf = hf_model(family, **HF_SOURCES[family])
    save_hf(hf, tmp_path / "src")
    ours = ssmblocks.from_pretrained(tmp_path / "src")
    ssmblocks.save_pretrained(ours, tmp_path / "out", format="hf")
    back = _transformers_load(tmp_path / "out")
    assert type(back) is type(hf)
    theirs, again = hf.state_dict(), back.state_dict()
    assert theirs.keys() == again.keys()
    for key in theirs:
        assert torch.equal(theirs[key], again[key]), key
    ids = make_ids()
    expected = hf_logits(hf, ids)
    assert_close(hf_logits(back, ids), expected, TOL, f"{family}: transformers on our save")
    assert_close(full_logits(ssmblocks.from_pretrained(tmp_path / "out"), ids), expected, TOL, f"{family}: reload")


@pytest.mark.parametrize("family", RECIPES)
def test_recipe_model_saves_as_hf_and_transformers_agrees(tmp_path, family):
    recipe = ssmblocks.Recipe.from_yaml(RECIPES[family])
    model = rerandomise(ssmblocks.build(recipe).eval())
    ssmblocks.save_pretrained(model, tmp_path, format="hf")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family
    back = _transformers_load(tmp_path)
    ids = make_ids()
    expected = full_logits(model, ids)
    assert_close(hf_logits(back, ids)[..., :VOCAB], expected, TOL, f"{family}: transformers")
    reloaded = ssmblocks.from_pretrained(tmp_path)
    assert_close(full_logits(reloaded, ids)[..., :VOCAB], expected, TOL, f"{family}: ssmblocks reload")


@pytest.mark.parametrize("family", ["mamba2", "bamba"])
def test_saved_config_is_standard_json(tmp_path, family):
    recipe = ssmblocks.Recipe.from_yaml(RECIPES[family].replace(", dt_limit: [0.05, 0.3]", ""))
    ssmblocks.save_pretrained(ssmblocks.build(recipe), tmp_path, format="hf")

    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    json.loads((tmp_path / "config.json").read_text(), parse_constant=reject)


HYBRID = """
name: tiny-hybrid
vocab_size: 97
pad_vocab_size_multiple: 8
d_model: 32
n_layers: 4
tie_embeddings: false
mixers:
  s: {kind: selective_ssm, d_state: 4}
  d: {kind: ssd, d_state: 8, head_dim: 8, n_groups: 2, chunk_size: 4, D_has_hdim: true}
  a: {kind: attention, n_heads: 4, n_kv_heads: 2}
  p: {kind: parallel, mixers: [d, a]}
mlp: {hidden_dim: 48}
pattern: s d a p
"""


@pytest.mark.parametrize("shard_size", [None, 4000], ids=["one-file", "sharded"])
def test_hybrid_round_trips_in_ssmblocks_format(tmp_path, shard_size):
    model = rerandomise(ssmblocks.build(ssmblocks.Recipe.from_yaml(HYBRID)).eval())
    kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
    ssmblocks.save_pretrained(model, tmp_path, format="ssmblocks", **kwargs)
    assert (tmp_path / "recipe.yaml").is_file() and not (tmp_path / "config.json").exists()
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert (len(set(shards)) > 1) == (shard_size is not None)
    back = ssmblocks.from_pretrained(tmp_path)
    assert back.recipe == model.recipe
    ids = make_ids()
    expected = full_logits(model, ids)
    assert_close(full_logits(back, ids), expected, 1e-6, "hybrid reload")
    assert_close(step_logits(back, ids), expected, TOL, "hybrid reload, decode")


def test_tied_embeddings_stay_tied_through_ssmblocks_format(tmp_path):
    recipe = ssmblocks.Recipe.from_yaml(RECIPES["mamba"])
    model = rerandomise(ssmblocks.build(recipe).eval())
    ssmblocks.save_pretrained(model, tmp_path, format="ssmblocks")
    back = ssmblocks.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.embedding.weight
    assert torch.equal(back.embedding.weight, model.embedding.weight)


def test_hybrid_cannot_be_saved_as_hf(tmp_path):
    model = ssmblocks.build(ssmblocks.Recipe.from_yaml(HYBRID))
    with pytest.raises(ssmblocks.CheckpointError, match="format='ssmblocks'"):
        ssmblocks.save_pretrained(model, tmp_path / "out", format="hf")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_unknown_save_format_is_an_error(tmp_path):
    model = ssmblocks.build(ssmblocks.Recipe.from_yaml(RECIPES["mamba"]))
    with pytest.raises(ssmblocks.CheckpointError, match="format must be 'hf' or 'ssmblocks'"):
        ssmblocks.save_pretrained(model, tmp_path / "out", format="gguf")


# --- tokenizer.json --------------------------------------------------------------------------------------


@pytest.mark.parametrize("save_format", ["hf", "ssmblocks"])
def test_tokenizer_json_is_loaded_and_saved_back(tmp_path, save_format):
    pytest.importorskip("transformers")
    hf = hf_model("mamba", **HF_SOURCES["mamba"])
    save_hf(hf, tmp_path / "src")
    tokenizer = tiny_tokenizer()
    tokenizer.save(str(tmp_path / "src" / "tokenizer.json"))
    text = "the mamba layer says hello world"

    model = ssmblocks.from_pretrained(tmp_path / "src")
    assert model.tokenizer is not None
    assert model.tokenizer.encode(text).ids == tokenizer.encode(text).ids
    assert model.tokenizer.get_vocab() == tokenizer.get_vocab()

    ssmblocks.save_pretrained(model, tmp_path / "out", format=save_format)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == json.loads(tokenizer.to_str())
    again = ssmblocks.from_pretrained(tmp_path / "out")
    assert again.tokenizer.encode(text).ids == tokenizer.encode(text).ids


def test_no_tokenizer_json_means_no_tokenizer(tmp_path):
    model = ssmblocks.build(ssmblocks.Recipe.from_yaml(RECIPES["mamba"]))
    ssmblocks.save_pretrained(model, tmp_path / "a", format="hf")
    loaded = ssmblocks.from_pretrained(tmp_path / "a")
    assert loaded.tokenizer is None
    ssmblocks.save_pretrained(loaded, tmp_path / "b", format="hf")
    assert not (tmp_path / "b" / "tokenizer.json").exists()


# --- hub ids -----------------------------------------------------------------------------------------------


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model = rerandomise(ssmblocks.build(ssmblocks.Recipe.from_yaml(RECIPES["mamba2"])).eval())
    ssmblocks.save_pretrained(model, tmp_path / "snapshot", format="hf")
    tiny_tokenizer().save(str(tmp_path / "snapshot" / "tokenizer.json"))
    calls = []

    def fake_snapshot_download(repo_id, *args, **kwargs):
        calls.append((repo_id, args, kwargs))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = ssmblocks.from_pretrained("org/name", revision="abc")

    assert len(calls) == 1
    repo_id, args, kwargs = calls[0]
    assert repo_id == "org/name" and args == ()
    assert kwargs["revision"] == "abc"
    patterns = kwargs["allow_patterns"]
    for needed in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors", "tokenizer.json"):
        assert any(fnmatch.fnmatch(needed, p) for p in patterns), (needed, patterns)
    assert loaded.tokenizer is not None
    ids = make_ids()
    assert_close(full_logits(loaded, ids), full_logits(model, ids), 1e-6, "hub load")


def test_hub_repo_with_only_pickled_weights_downloads_them_second(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model = rerandomise(ssmblocks.build(ssmblocks.Recipe.from_yaml(RECIPES["mamba2"])).eval())
    ssmblocks.save_pretrained(model, tmp_path / "repo", format="hf")
    state = {k: v.clone() for k, v in _safetensors_state(tmp_path / "repo").items()}
    for path in [*(tmp_path / "repo").glob("model*.safetensors"), tmp_path / "repo" / "model.safetensors.index.json"]:
        path.unlink()
    torch.save(state, tmp_path / "repo" / "pytorch_model.bin")
    patterns_asked = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=()):
        patterns_asked.append(list(allow_patterns))
        return str(tmp_path / "repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = ssmblocks.from_pretrained("org/name")
    assert len(patterns_asked) == 2
    assert not any(fnmatch.fnmatch("pytorch_model.bin", p) for p in patterns_asked[0]), (
        "no .bin while safetensors may exist"
    )
    assert any(fnmatch.fnmatch("pytorch_model.bin", p) for p in patterns_asked[1])
    ids = make_ids()
    assert_close(full_logits(loaded, ids), full_logits(model, ids), 1e-6, "hub .bin load")


def test_hub_download_failure_is_a_checkpoint_error(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ssmblocks.CheckpointError, match="'ckpts/mamba' is not a local folder.*no connection"):
        ssmblocks.from_pretrained("ckpts/mamba")


def _safetensors_state(folder):
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return {k: v for name in set(index["weight_map"].values()) for k, v in load_file(str(folder / name)).items()}
