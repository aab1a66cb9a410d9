"""Bad checkpoints fail with a CheckpointError that names the problem, and never give a model with random
weights: missing / unexpected / mis-shaped tensors, corrupt files, configs that contradict the weights,
malicious pickles, folders without weights, bad paths, broken shard indexes."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ssmblocks
from ssmblocks import CheckpointError
from tests.checkpoints.builders import (
    TINY_BAMBA,
    drop_manifest,
    hf_model,
    original_config,
    save_hf,
    to_mamba_ssm,
    write_original,
)

pytest.importorskip("transformers")

HF = {
    "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=8, tie_word_embeddings=True),
    "mamba2": dict(
        hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, n_groups=2, state_size=8, chunk_size=8
    ),
    "bamba": TINY_BAMBA,
}
ORIGINAL_SSM_CFG = {
    "mamba1": {"d_state": 8, "d_conv": 4, "expand": 2},
    "mamba2": {"layer": "Mamba2", "ngroups": 2, "d_state": 8, "headdim": 8},
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Known-good checkpoint folders (each loads): HF mamba / mamba2 / bamba, original mamba1 / mamba2."""
    root = tmp_path_factory.mktemp("good")
    for family, config in HF.items():
        save_hf(hf_model(family, **config), root / family)
    m1 = hf_model("mamba", vocab_size=104, use_bias=False, hidden_size=32, num_hidden_layers=2, state_size=8)
    write_original(
        root / "original-mamba1",
        to_mamba_ssm(m1.state_dict()),
        original_config(32, 2, ORIGINAL_SSM_CFG["mamba1"], 8),
    )
    m2 = hf_model("mamba2", vocab_size=112, tie_word_embeddings=True, **HF["mamba2"])
    write_original(
        root / "original-mamba2",
        to_mamba_ssm(m2.state_dict()),
        original_config(32, 2, ORIGINAL_SSM_CFG["mamba2"], 16),
    )
    for name in [*HF, "original-mamba1", "original-mamba2"]:
        ssmblocks.from_pretrained(root / name)  # the baseline loads
    return root


@pytest.fixture
def copy_of(good, tmp_path):
    def copy(name):
        return shutil.copytree(good / name, tmp_path / name)

    return copy


def _edit_tensors(folder, edit, file="model.safetensors"):
    path = folder / file
    if file.endswith(".bin"):
        tensors = torch.load(path, weights_only=True)
        edit(tensors)
        torch.save(tensors, path)
    else:
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _load_fails(folder, match):
    with pytest.raises(CheckpointError, match=match) as info:
        ssmblocks.from_pretrained(folder)
    return str(info.value)


# --- tensors that do not fit ---------------------------------------------------------------------------------

MISSING = [
    ("mamba", "backbone.layers.1.mixer.D"),
    ("mamba", "backbone.norm_f.weight"),
    ("mamba2", "backbone.layers.0.mixer.dt_bias"),
    ("mamba2", "lm_head.weight"),  # untied
    ("bamba", "model.layers.1.self_attn.k_proj.weight"),
    ("bamba", "model.layers.2.feed_forward.gate_proj.weight"),
]


@pytest.mark.parametrize("family, key", MISSING, ids=[f"{f}-{k}" for f, k in MISSING])
def test_missing_key(copy_of, family, key):
    folder = copy_of(family)
    _edit_tensors(folder, lambda t: t.pop(key))
    message = _load_fails(folder, rf"missing keys \(1\): {re.escape(key)}\b")
    assert "nothing was loaded" in message and "unexpected" not in message


UNEXPECTED = [
    ("mamba", "backbone.layers.0.mixer.extra_scale"),
    ("mamba", "backbone.layers.2.norm.weight"),  # a layer the config does not have
    ("mamba2", "backbone.layers.0.mixer.in_proj.bias"),  # use_bias is false
    ("bamba", "model.layers.0.self_attn.q_proj.weight"),  # attention weights on an SSD layer
    ("bamba", "rotary_emb.inv_freq"),
]


@pytest.mark.parametrize("family, key", UNEXPECTED, ids=[f"{f}-{k}" for f, k in UNEXPECTED])
def test_unexpected_key(copy_of, family, key):
    folder = copy_of(family)
    _edit_tensors(folder, lambda t: t.__setitem__(key, torch.zeros(32, 32)))
    message = _load_fails(folder, rf"unexpected keys \(1\): {re.escape(key)}\b")
    assert "missing" not in message


WRONG_SHAPE = [
    ("mamba", "backbone.layers.0.mixer.out_proj.weight", (64, 32), "(64, 32), model (32, 64)"),
    ("mamba2", "backbone.layers.1.mixer.A_log", (4,), "(4,), model (8,)"),
    ("bamba", "model.layers.1.self_attn.v_proj.weight", (32, 32), "(32, 32), model (16, 32)"),
]


@pytest.mark.parametrize("family, key, shape, says", WRONG_SHAPE, ids=[f"{f}-{k}" for f, k, _, _ in WRONG_SHAPE])
def test_wrong_shape(copy_of, family, key, shape, says):
    folder = copy_of(family)
    _edit_tensors(folder, lambda t: t.__setitem__(key, torch.zeros(shape)))
    _load_fails(folder, rf"wrong shapes \(1\): {re.escape(key)}: checkpoint {re.escape(says)}")


def test_tied_config_with_a_different_lm_head(copy_of):
    folder = copy_of("mamba")  # tie_word_embeddings: true, so transformers saved no lm_head.weight
    _edit_tensors(folder, lambda t: t.__setitem__("lm_head.weight", torch.randn(97, 32)))
    _load_fails(folder, "ties the embeddings, but the checkpoint's lm_head.weight differs")


# --- corrupt files -------------------------------------------------------------------------------------------


def test_truncated_safetensors(copy_of):
    folder = copy_of("mamba")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    _load_fails(folder, r"model\.safetensors: not a readable safetensors file, truncated or corrupt")


def test_garbage_safetensors(copy_of):
    folder = copy_of("mamba2")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _load_fails(folder, r"model\.safetensors: not a readable safetensors file")


def test_truncated_shard(tmp_path):
    save_hf(hf_model("mamba", **HF["mamba"]), tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    _load_fails(tmp_path, rf"{re.escape(shard.name)}: not a readable safetensors file")


def test_truncated_bin(copy_of):
    folder = copy_of("original-mamba1")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    _load_fails(folder, r"pytorch_model\.bin: not a readable PyTorch checkpoint")


def test_bin_that_is_not_a_state_dict(copy_of):
    folder = copy_of("original-mamba1")
    torch.save([torch.zeros(2)], folder / "pytorch_model.bin")
    _load_fails(folder, "expected a flat dict of tensors")


class _RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _WritesFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _torch_zip(obj, path):
    torch.save(obj, path)


def _torch_legacy(obj, path):
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _plain_pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload", [_RunsShell, _WritesFile], ids=["os.system", "exec"])
@pytest.mark.parametrize("writer", [_torch_zip, _torch_legacy, _plain_pickle], ids=["zip", "legacy", "pickle"])
def test_malicious_pickle_is_refused_and_never_run(copy_of, tmp_path, payload, writer):
    folder = copy_of("original-mamba1")
    marker = tmp_path / "pwned"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["backbone.layers.0.mixer.D"] = payload(marker)
    writer(state, folder / "pytorch_model.bin")
    assert not marker.exists()
    _load_fails(folder, r"pytorch_model\.bin: refused to load")
    assert not marker.exists(), "the checkpoint ran code"


# --- configs that contradict the weights -------------------------------------------------------------------

ORIGINAL_DISAGREEMENTS = {
    "mamba2-d_state": ("original-mamba2", {"d_state": 16}, r"config/weights disagreement: .*ssm_cfg\.d_state=16"),
    "mamba2-headdim": ("original-mamba2", {"headdim": 16}, r"config/weights disagreement: .*ssm_cfg\.headdim=16"),
    "mamba2-ngroups": ("original-mamba2", {"ngroups": 3}, r"ssm_cfg\.ngroups=3 does not divide"),
    "mamba2-d_conv": ("original-mamba2", {"d_conv": 3}, r"ssm_cfg\.d_conv=3"),
    "mamba2-says-Mamba1": ("original-mamba2", {"layer": "Mamba1"}, r"ssm_cfg\.layer='Mamba1'.*Mamba2 layer"),
    "mamba1-says-Mamba2": ("original-mamba1", {"layer": "Mamba2"}, r"ssm_cfg\.layer='Mamba2'.*Mamba1 layer"),
    "mamba1-d_state": ("original-mamba1", {"d_state": 16}, r"config/weights disagreement: .*ssm_cfg\.d_state=16"),
    "mamba1-expand": ("original-mamba1", {"expand": 4}, r"ssm_cfg\.expand=4"),
    "mamba1-d_conv": ("original-mamba1", {"d_conv": 2}, r"ssm_cfg\.d_conv=2"),
    "mamba1-dt_rank": ("original-mamba1", {"dt_rank": 7}, r"ssm_cfg\.dt_rank=7"),
}


@pytest.mark.parametrize("name, ssm_cfg, match", ORIGINAL_DISAGREEMENTS.values(), ids=ORIGINAL_DISAGREEMENTS.keys())
def test_original_ssm_cfg_contradicts_the_weights(copy_of, name, ssm_cfg, match):
    folder = copy_of(name)
    _edit_config(folder, lambda c: c["ssm_cfg"].update(ssm_cfg))
    _load_fails(folder, match)


ORIGINAL_TOP_LEVEL = {
    "pad-multiple": ({"pad_vocab_size_multiple": 16}, r"padded vocab_size=112.*backbone\.embedding\.weight"),
    "vocab_size": ({"vocab_size": 200}, r"padded vocab_size=200"),
    "n_layer-more": ({"n_layer": 3}, r"missing keys \(\d+\): backbone\.layers\.2\."),
    "n_layer-fewer": ({"n_layer": 1}, r"unexpected keys \(\d+\): backbone\.layers\.1\."),
    "d_model": ({"d_model": 48}, r"config/weights disagreement|wrong shapes"),
    "attention-layers": ({"attn_layer_idx": [1]}, r"attn_layer_idx.*not supported"),
    "layernorm": ({"rms_norm": False}, r"rms_norm=false.*not supported"),
}


@pytest.mark.parametrize("change, match", ORIGINAL_TOP_LEVEL.values(), ids=ORIGINAL_TOP_LEVEL.keys())
def test_original_config_contradicts_the_weights(copy_of, change, match):
    folder = copy_of("original-mamba1")
    _edit_config(folder, lambda c: c.update(change))
    _load_fails(folder, match)


def test_original_tied_config_with_a_different_lm_head(copy_of):
    folder = copy_of("original-mamba2")
    _edit_tensors(folder, lambda t: t["lm_head.weight"].add_(1.0), file="pytorch_model.bin")
    _load_fails(folder, "ties the embeddings")


HF_DISAGREEMENTS = {
    "mamba-hidden_size": ("mamba", {"hidden_size": 48, "intermediate_size": 96}, r"wrong shapes \(\d+\): .*embeddings"),
    "mamba-intermediate_size": ("mamba", {"intermediate_size": 96}, r"intermediate_size=96"),
    "mamba-state_size": ("mamba", {"state_size": 4}, r"wrong shapes \(\d+\): .*mixer\.(x_proj|A_log)"),
    "mamba-more-layers": ("mamba", {"num_hidden_layers": 3}, r"missing keys \(\d+\): backbone\.layers\.2\."),
    "mamba-untied-without-head": ("mamba", {"tie_word_embeddings": False}, r"missing keys \(1\): lm_head\.weight"),
    "mamba-vocab": ("mamba", {"vocab_size": 98}, r"wrong shapes \(\d+\): backbone\.embeddings\.weight"),
    "mamba2-state_size": ("mamba2", {"state_size": 16}, r"wrong shapes \(\d+\): .*mixer\.in_proj\.weight"),
    "mamba2-n_groups": ("mamba2", {"n_groups": 4}, r"wrong shapes \(\d+\): .*mixer\.conv1d\.weight"),
    "mamba2-heads": ("mamba2", {"num_heads": 4, "head_dim": 16}, r"wrong shapes \(\d+\): .*mixer\.A_log"),
    "mamba2-heads-times-dim": ("mamba2", {"num_heads": 4}, r"num_heads \* head_dim = 4 \* 8 must equal"),
    "bamba-kv-heads": ("bamba", {"num_key_value_heads": 4}, r"wrong shapes \(\d+\): .*self_attn\.k_proj\.weight"),
    "bamba-attn-layers": ("bamba", {"attn_layer_indices": [2]}, r"missing keys.*self_attn(.|\n)*unexpected keys"),
    "bamba-mlp": ("bamba", {"intermediate_size": 64}, r"wrong shapes \(\d+\): .*feed_forward"),
    "bamba-mamba-heads": ("bamba", {"mamba_n_heads": 4, "mamba_d_head": 16}, r"wrong shapes .*mamba\.A_log"),
}


@pytest.mark.parametrize("family, change, match", HF_DISAGREEMENTS.values(), ids=HF_DISAGREEMENTS.keys())
def test_hf_config_contradicts_the_weights(copy_of, family, change, match):
    folder = copy_of(family)
    _edit_config(folder, lambda c: c.update(change))
    _load_fails(folder, match)


@pytest.mark.parametrize("family, key", [("mamba", "hidden_size"), ("mamba2", "num_heads"), ("bamba", "vocab_size")])
def test_hf_config_without_a_required_field(copy_of, family, key):
    folder = copy_of(family)
    _edit_config(folder, lambda c: c.pop(key))
    _load_fails(folder, rf"config\.json has no '{key}'")


@pytest.mark.parametrize(
    "config, match",
    [
        ({"model_type": "llama", "hidden_size": 32}, r"unknown model_type 'llama'"),
        ({"hidden_size": 32}, r"unknown model_type None"),
    ],
    ids=["llama", "no-model_type"],
)
def test_unknown_model_type(copy_of, config, match):
    folder = copy_of("mamba")
    (folder / "config.json").write_text(json.dumps(config))
    _load_fails(folder, match)


def test_config_that_is_not_json(copy_of):
    folder = copy_of("mamba")
    (folder / "config.json").write_text("{model_type: mamba")
    _load_fails(folder, r"config\.json: not valid JSON")


def test_weights_without_config(copy_of):
    folder = copy_of("mamba")
    (folder / "config.json").unlink()
    _load_fails(folder, r"no config\.json")


@pytest.mark.parametrize(
    "text",
    ["name: x\nvocab_size: 97\nd_model: -1\n", "name: [unclosed\n", "just a string\n"],
    ids=["invalid-field", "yaml-syntax", "not-a-mapping"],
)
def test_broken_recipe_yaml(tmp_path, text):
    recipe = ssmblocks.Recipe.from_yaml(
        "name: t\nvocab_size: 97\nd_model: 32\nn_layers: 1\nmixers: {m: {kind: ssd, d_state: 8, head_dim: 8}}\n"
        "pattern: m\n"
    )
    ssmblocks.save_pretrained(ssmblocks.build(recipe), tmp_path, format="ssmblocks")
    drop_manifest(tmp_path)  # as another tool or an older ssmblocks wrote it: recipe.yaml decides
    (tmp_path / "recipe.yaml").write_text(text)
    _load_fails(tmp_path, r"recipe\.yaml")


# --- folders and paths -------------------------------------------------------------------------------------


def test_folder_without_weights(copy_of):
    folder = copy_of("mamba")
    (folder / "model.safetensors").unlink()
    _load_fails(folder, r"no weights found \(\*\.safetensors or \*\.bin\)")


def test_empty_folder(tmp_path):
    _load_fails(tmp_path, "no weights found")


@pytest.mark.parametrize("path", ["{tmp}/does-not-exist", "{tmp}/a/b", "not a hub id", "a/b/c"])
def test_path_that_is_neither_a_folder_nor_a_hub_id(tmp_path, monkeypatch, path):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("must not reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    _load_fails(path.format(tmp=tmp_path), "neither a local folder nor a hub id")


def test_path_to_a_file(copy_of):
    folder = copy_of("mamba")
    _load_fails(folder / "model.safetensors", "is a file; pass the checkpoint's folder")


def _sharded(tmp_path):
    save_hf(hf_model("bamba", **HF["bamba"]), tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    return index


def test_shard_index_naming_a_missing_shard(tmp_path):
    index = _sharded(tmp_path)
    gone = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / gone).unlink()
    _load_fails(tmp_path, rf"lists shards that are missing: \['{re.escape(gone)}'\]")


def test_shard_index_that_is_not_an_index(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _load_fails(tmp_path, "not a valid shard index")


def test_tensor_in_two_shards(tmp_path):
    _sharded(tmp_path)
    first, second = sorted(tmp_path.glob("model-*.safetensors"))[:2]
    key = next(iter(load_file(str(first))))
    _edit_tensors(tmp_path, lambda t: t.__setitem__(key, torch.zeros(1)), file=second.name)
    _load_fails(tmp_path, rf"tensor '{re.escape(key)}' appears in more than one weight file")


def test_shard_missing_a_tensor_listed_in_the_index(tmp_path):
    index = _sharded(tmp_path)
    key, shard = next(iter(index["weight_map"].items()))
    _edit_tensors(tmp_path, lambda t: t.pop(key), file=shard)
    _load_fails(tmp_path, rf"missing keys \(1\): {re.escape(key)}")
