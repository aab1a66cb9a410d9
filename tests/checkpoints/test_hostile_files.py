"""The loader trusts nothing and the saver touches only its own files: index entries outside the folder, FIFOs,
non-float or non-finite tensors, flipped bytes, corrupt tokenizers, configs of the wrong type, user files
named like weights, stale older-format checkpoints, leftovers of killed saves, empty target paths."""

from __future__ import annotations

import json
import os
import re
import signal
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import ssmblocks
from ssmblocks import CheckpointError
from ssmblocks.errors import NonFiniteWarning
from tests.checkpoints.builders import full_logits, make_ids, rerandomise, tiny_tokenizer
from tests.helpers import assert_close

RECIPE = """
name: tiny
vocab_size: 97
d_model: 32
n_layers: 2
tie_embeddings: false
mixers:
  m: {kind: ssd, d_state: 8, head_dim: 8, n_groups: 2, chunk_size: 8}
pattern: m m
"""
SMALL_SHARDS = 4000  # bytes: several shards for this model
INDEX = "model.safetensors.index.json"


def _model(seed: int):
    return rerandomise(ssmblocks.build(ssmblocks.Recipe.from_yaml(RECIPE)).eval(), seed)


def _same(folder, model):
    ids = make_ids()
    assert_close(full_logits(ssmblocks.from_pretrained(folder), ids), full_logits(model, ids), 1e-6, "loaded")


def _saved(folder, seed=1, **kwargs):
    model = _model(seed)
    ssmblocks.save_pretrained(model, folder, **kwargs)
    return model


def _index(folder):
    return json.loads((folder / INDEX).read_text())


def _rewrite_index(folder, edit):
    index = _index(folder)
    edit(index)
    (folder / INDEX).write_text(json.dumps(index))


def _shard(folder, k=0):
    return folder / sorted(set(_index(folder)["weight_map"].values()))[k]


def _load_fails(folder, match, **kwargs):
    with pytest.raises(CheckpointError, match=match):
        ssmblocks.from_pretrained(folder, **kwargs)


@pytest.fixture
def no_hang():
    """Fail, rather than hang the suite, if a test blocks (on a FIFO) for 20 s."""

    def hung(*_):
        raise AssertionError("blocked: the loader opened a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --- the saver touches only files of the previous checkpoint -------------------------------------------------


def test_resave_keeps_user_files_named_like_weights(tmp_path):
    folder = tmp_path / "ckpt"
    _saved(folder, max_shard_size=SMALL_SHARDS)
    ema = {"w": torch.arange(4.0)}
    save_file(ema, str(folder / "model_ema.safetensors"))
    (folder / "model-notes.safetensors.txt").write_text("mine")
    newer = _saved(folder, seed=2)
    assert torch.equal(load_file(str(folder / "model_ema.safetensors"))["w"], ema["w"])
    assert (folder / "model-notes.safetensors.txt").read_text() == "mine"
    _same(folder, newer)


@pytest.mark.parametrize("path", ["", " "])
def test_save_into_an_empty_path_is_refused(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_text("the user's file")
    with pytest.raises(CheckpointError, match="empty path"):
        ssmblocks.save_pretrained(_model(1), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("path", ["", " "])
def test_load_from_an_empty_path_is_refused(tmp_path, monkeypatch, path):
    _saved(tmp_path)  # a checkpoint in the current folder must not be what "" means
    monkeypatch.chdir(tmp_path)
    _load_fails(path, "the path is empty")


def _write_sharded_bin(folder, model):
    """An older HF checkpoint: config.json, pytorch_model-0000k-of-00002.bin shards and their index."""
    ssmblocks.save_pretrained(model, folder)
    state = {
        k: v for name in set(_index(folder)["weight_map"].values()) for k, v in load_file(str(folder / name)).items()
    }
    for path in [*folder.glob("model*.safetensors"), folder / INDEX]:
        path.unlink()
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2]}
    halves["pytorch_model-00002-of-00002.bin"] = keys[len(keys) // 2 :]
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_stale_sharded_bin_never_wins_over_a_newer_save(tmp_path):
    folder = tmp_path / "ckpt"
    older = _model(1)
    _write_sharded_bin(folder, older)
    _same(folder, older)
    newer = _saved(folder, seed=2)
    _same(folder, newer)
    assert not list(folder.glob("*.bin")) and not (folder / "pytorch_model.bin.index.json").exists()


def test_next_save_removes_leftovers_of_a_killed_save(tmp_path):
    folder = tmp_path / "ckpt"
    _saved(folder)
    (folder / ".ssmblocks-save-0badc0de").mkdir()
    (folder / ".ssmblocks-save-0badc0de" / "model-0badc0de-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
    (folder / "model-0badc0de-00001-of-00002.safetensors").write_bytes(b"moved in, never committed")
    (folder / "notes.txt").write_text("my notes")
    newer = _saved(folder, seed=2)
    names = sorted(p.name for p in folder.iterdir())
    (shard,) = [n for n in names if n.endswith(".safetensors")]
    assert names == sorted(["config.json", INDEX, shard, "notes.txt"])
    _same(folder, newer)


# --- index entries, non-regular files ---------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["../outside.safetensors", "{abs}", "sub/shard.safetensors", ".."])
def test_index_entry_outside_the_folder_is_refused(tmp_path, entry):
    folder = tmp_path / "ckpt"
    _saved(folder, max_shard_size=SMALL_SHARDS)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(_shard(folder).read_bytes())
    entry = entry.format(abs=outside)
    first = _shard(folder).name
    _rewrite_index(
        folder, lambda i: i["weight_map"].update({k: entry for k, v in i["weight_map"].items() if v == first})
    )
    _load_fails(folder, rf"{re.escape(repr(entry))} is not a plain file name in the checkpoint folder")


@pytest.mark.parametrize("field, value", [("copies", ["config.json", "notes.txt"]), ("sha256", {"notes.txt": "0"})])
def test_manifest_naming_other_files_is_refused_and_they_survive_a_save(tmp_path, field, value):
    folder = tmp_path / "ckpt"
    _saved(folder)
    (folder / "notes.txt").write_text("my notes")
    _rewrite_index(folder, lambda i: i["metadata"]["ssmblocks"].__setitem__(field, value))
    _load_fails(folder, r"lists files a save does not write: \['notes\.txt'\]")
    newer = _saved(folder, seed=2)
    assert (folder / "notes.txt").read_text() == "my notes"
    _same(folder, newer)


def test_weight_map_that_is_not_a_mapping(tmp_path):
    folder = tmp_path / "ckpt"
    _saved(folder)
    _rewrite_index(folder, lambda i: i.__setitem__("weight_map", ["model.safetensors"]))
    _load_fails(folder, "weight_map must map tensor names to file names")


def _fifo_at(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


@pytest.mark.parametrize("which", ["shard", "index", "config.json", "tokenizer.json"])
def test_fifo_in_place_of_a_file_is_refused_without_blocking(tmp_path, no_hang, which):
    folder = tmp_path / "ckpt"
    _saved(folder)
    from ssmblocks.checkpoints.io import read_manifest

    if which == "tokenizer.json":
        _fifo_at(folder / "tokenizer.json")  # no committed tokenizer: a tokenizer.json beside is read
    elif which == "config.json":
        manifest_gone = _index(folder)
        del manifest_gone["metadata"]["ssmblocks"]
        (folder / INDEX).write_text(json.dumps(manifest_gone))
        assert read_manifest(folder) is None
        _fifo_at(folder / "config.json")
    else:
        _fifo_at(_shard(folder) if which == "shard" else folder / INDEX)
    _load_fails(folder, "not a regular file")


def test_fifo_named_like_the_single_weight_file(tmp_path, no_hang):
    folder = tmp_path / "ckpt"
    _saved(folder)
    (folder / INDEX).unlink()
    os.mkfifo(folder / "model.safetensors")
    _load_fails(folder, r"model\.safetensors: not a regular file")


# --- tensors that would load silently wrong ---------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_non_float_tensor_is_refused(tmp_path, dtype):
    folder = tmp_path / "ckpt"
    _saved(folder)
    shard = _shard(folder)
    tensors = load_file(str(shard))
    key = "backbone.layers.0.mixer.out_proj.weight"
    tensors[key] = torch.ones_like(tensors[key]).to(dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _rewrite_index(folder, lambda i: i["metadata"].pop("ssmblocks"))  # no checksum to stop it first
    _load_fails(folder, rf"not float16/bfloat16/float32/float64 \(1\): {re.escape(key)}: {re.escape(str(dtype))}")


def _with_nan(folder):
    shard = _shard(folder)
    tensors = load_file(str(shard))
    key = "backbone.layers.1.mixer.in_proj.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _rewrite_index(folder, lambda i: i["metadata"].pop("ssmblocks"))
    return key


def test_non_finite_weights_warn_on_load_and_can_be_refused(tmp_path):
    folder = tmp_path / "ckpt"
    _saved(folder)
    key = _with_nan(folder)
    with pytest.warns(NonFiniteWarning, match=rf"1 tensor\(s\) hold NaN or infinity: {re.escape(key)}"):
        ssmblocks.from_pretrained(folder)
    _load_fails(folder, rf"hold NaN or infinity: {re.escape(key)}; nothing was loaded", non_finite="error")
    with pytest.raises(ValueError, match="non_finite must be 'warn' or 'error'"):
        ssmblocks.from_pretrained(folder, non_finite="ignore")


def test_non_finite_weights_warn_on_save(tmp_path):
    model = _model(1)
    with torch.no_grad():
        model.layers[0].mixer.D.fill_(float("inf"))
    with pytest.warns(NonFiniteWarning, match=r"layers\.0\.mixer\.D"):
        ssmblocks.save_pretrained(model, tmp_path / "ckpt", format="ssmblocks")


def test_finite_weights_load_without_warning(tmp_path):
    _saved(tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        ssmblocks.from_pretrained(tmp_path / "ckpt")


def test_flipped_payload_byte_is_detected(tmp_path):
    folder = tmp_path / "ckpt"
    _saved(folder, max_shard_size=SMALL_SHARDS)
    shard = _shard(folder, 1)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # a bit of the last tensor's payload: still a readable file
    shard.write_bytes(bytes(data))
    _load_fails(folder, rf"{re.escape(shard.name)}: sha256 differs from the one recorded when it was saved")


def test_corrupt_tokenizer_is_named(tmp_path):
    folder = tmp_path / "ckpt"
    model = _model(1)
    model.tokenizer = tiny_tokenizer()
    ssmblocks.save_pretrained(model, folder)
    assert ssmblocks.from_pretrained(folder).tokenizer is not None
    _rewrite_index(folder, lambda i: i["metadata"]["ssmblocks"].update(tokenizer=None))
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3')
    _load_fails(folder, r"tokenizer\.json: not a valid tokenizer file")


def test_committed_tokenizer_is_checked_against_its_sha256(tmp_path):
    folder = tmp_path / "ckpt"
    model = _model(1)
    model.tokenizer = tiny_tokenizer()
    ssmblocks.save_pretrained(model, folder)
    (committed,) = folder.glob("tokenizer-*.json")
    committed.write_text(committed.read_text().replace('"', "'", 1))
    _load_fails(folder, rf"{re.escape(committed.name)}: sha256 differs")


def test_committed_tokenizer_that_is_missing_is_an_error(tmp_path):
    folder = tmp_path / "ckpt"
    model = _model(1)
    model.tokenizer = tiny_tokenizer()
    ssmblocks.save_pretrained(model, folder)
    (committed,) = folder.glob("tokenizer-*.json")
    committed.unlink()
    _load_fails(folder, rf"{re.escape(committed.name)}: the tokenizer model\.safetensors\.index\.json lists is missing")


def test_edited_config_copy_warns_and_the_committed_one_loads(tmp_path):
    folder = tmp_path / "ckpt"
    model = _saved(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.warns(UserWarning, match=r"config\.json differs from the config\.json committed with the weights"):
        _same(folder, model)


# --- configs of the wrong type or size -------------------------------------------------------------------


@pytest.mark.parametrize("config, kind", [([1, 2], "list"), (None, "NoneType"), ("mamba", "str")])
def test_config_that_is_not_an_object(tmp_path, config, kind):
    folder = tmp_path / "ckpt"
    _saved(folder)
    _rewrite_index(folder, lambda i: i["metadata"].pop("ssmblocks"))
    (folder / "config.json").write_text(json.dumps(config))
    _load_fails(folder, rf"config\.json: expected a JSON object, got {kind}")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
        ({"num_hidden_layers": "2"}, "num_hidden_layers must be a positive integer, got '2'"),
        ({"vocab_size": 10**12}, r"vocab_size\n  Input should be less than or equal to 4194304"),
        ({"num_hidden_layers": 10**10}, "num_hidden_layers=10000000000 is more than the limit 4096"),
    ],
    ids=["zero-width", "string-count", "vocab-1e12", "layers-1e10"],
)
def test_hf_config_sizes_are_checked_before_building(tmp_path, change, match):
    folder = tmp_path / "ckpt"
    _saved(folder)
    _rewrite_index(folder, lambda i: i["metadata"].pop("ssmblocks"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    _load_fails(folder, match)


def _original_folder(tmp_path, config):
    folder = tmp_path / "orig"
    folder.mkdir()
    model = _model(1)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = model.state_dict()["lm_head.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    base = {"d_model": 32, "n_layer": 2, "vocab_size": 97, "pad_vocab_size_multiple": 1, "tie_embeddings": False}
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return folder


@pytest.mark.parametrize(
    "config, match",
    [
        ({"ssm_cfg": ["Mamba2"]}, r"ssm_cfg must be an object, got list"),
        ({"ssm_cfg": "Mamba2"}, r"ssm_cfg must be an object, got str"),
        ({"d_model": 0}, r"d_model must be a positive integer, got 0"),
        ({"ssm_cfg": {"layer": "Mamba2", "ngroups": 0}}, r"ngroups must be a positive integer, got 0"),
    ],
    ids=["ssm_cfg-list", "ssm_cfg-str", "d_model-0", "ngroups-0"],
)
def test_original_config_of_the_wrong_type(tmp_path, config, match):
    _load_fails(_original_folder(tmp_path, config), match)


def test_original_folder_builder_loads(tmp_path):
    _same(_original_folder(tmp_path, {"ssm_cfg": {"layer": "Mamba2", "ngroups": 2}}), _model(1))
