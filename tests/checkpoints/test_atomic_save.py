"""save_pretrained is atomic: a save that fails part-way leaves an existing folder byte-for-byte as it was
(the user's own files included) and leaves no temporary folder behind; a successful re-save replaces the
checkpoint, stale shards included, and keeps the user's files."""

from __future__ import annotations

import pytest
import torch

import ssmblocks
import ssmblocks.checkpoints.saving as ckpt_saving
from tests.checkpoints.builders import folder_bytes, full_logits, make_ids, rerandomise
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


def _model(seed: int):
    return rerandomise(ssmblocks.build(ssmblocks.Recipe.from_yaml(RECIPE)).eval(), seed)


def _shards(max_shard_size):
    return {} if max_shard_size is None else {"max_shard_size": max_shard_size}


def _leftovers(parent, folder):
    return [p.name for p in parent.iterdir() if p.name != folder.name]


class DiskFull(OSError):
    pass


def _failing_save_file(monkeypatch, fail_on_call: int):
    real = ckpt_saving.save_file
    calls = []

    def save_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == fail_on_call:
            raise DiskFull("no space left on device (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_saving, "save_file", save_file)
    return calls


@pytest.mark.parametrize("save_format", ["hf", "ssmblocks"])
@pytest.mark.parametrize(
    "first_shards, second_shards, fail_on_call",
    [
        pytest.param(SMALL_SHARDS, SMALL_SHARDS, 2, id="sharded-over-sharded-fails-at-shard-2"),
        pytest.param(None, SMALL_SHARDS, 3, id="sharded-over-one-file-fails-at-shard-3"),
        pytest.param(SMALL_SHARDS, None, 1, id="one-file-over-sharded-fails-at-once"),
    ],
)
def test_failed_save_leaves_folder_as_it_was(
    tmp_path, monkeypatch, save_format, first_shards, second_shards, fail_on_call
):
    folder = tmp_path / "ckpt"
    first = _model(seed=1)
    ssmblocks.save_pretrained(first, folder, format=save_format, **_shards(first_shards))
    (folder / "notes.txt").write_text("my notes")
    before = folder_bytes(folder)

    calls = _failing_save_file(monkeypatch, fail_on_call)
    with pytest.raises(DiskFull, match="simulated"):
        ssmblocks.save_pretrained(_model(seed=2), folder, format=save_format, **_shards(second_shards))
    assert len(calls) == fail_on_call

    assert folder_bytes(folder) == before
    assert [p for p in folder.iterdir() if p.is_dir()] == []
    assert _leftovers(tmp_path, folder) == [], "temporary folder left behind"
    monkeypatch.undo()
    ids = make_ids()
    assert_close(full_logits(ssmblocks.from_pretrained(folder), ids), full_logits(first, ids), 1e-6, "old model")


def test_failed_tokenizer_write_leaves_folder_as_it_was(tmp_path):
    folder = tmp_path / "ckpt"
    ssmblocks.save_pretrained(_model(seed=1), folder)
    (folder / "notes.txt").write_text("my notes")
    before = folder_bytes(folder)

    class BrokenTokenizer:
        def save(self, path):
            with open(path, "w") as f:
                f.write("{half a tok")
            raise OSError("tokenizer write failed (simulated)")

    model = _model(seed=2)
    model.tokenizer = BrokenTokenizer()
    with pytest.raises(OSError, match="tokenizer write failed"):
        ssmblocks.save_pretrained(model, folder)
    assert folder_bytes(folder) == before
    assert _leftovers(tmp_path, folder) == []


def test_failed_first_save_creates_no_folder(tmp_path, monkeypatch):
    _failing_save_file(monkeypatch, 1)
    with pytest.raises(DiskFull):
        ssmblocks.save_pretrained(_model(seed=1), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("save_format", ["hf", "ssmblocks"])
def test_resave_with_fewer_shards_removes_stale_shards(tmp_path, save_format):
    folder = tmp_path / "ckpt"
    ssmblocks.save_pretrained(_model(seed=1), folder, format=save_format, max_shard_size=SMALL_SHARDS)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 3
    (folder / "notes.txt").write_text("my notes")

    second = _model(seed=2)
    ssmblocks.save_pretrained(second, folder, format=save_format, max_shard_size=3 * SMALL_SHARDS)
    fewer = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert 1 < len(fewer) < len(shards)
    assert not set(fewer) & set(shards), "the new shard names carry the new shard count"
    assert (folder / "notes.txt").read_text() == "my notes"

    ssmblocks.save_pretrained(second, folder, format=save_format)  # one shard now
    config = "config.json" if save_format == "hf" else "recipe.yaml"
    (shard,) = folder.glob("model-*-00001-of-00001.safetensors")
    expected = [config, "model.safetensors.index.json", shard.name, "notes.txt"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    assert _leftovers(tmp_path, folder) == []
    ids = make_ids()
    assert_close(full_logits(ssmblocks.from_pretrained(folder), ids), full_logits(second, ids), 1e-6, "re-saved")


def test_resave_sharded_over_one_file_removes_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    ssmblocks.save_pretrained(_model(seed=1), folder)
    second = _model(seed=2)
    ssmblocks.save_pretrained(second, folder, max_shard_size=SMALL_SHARDS)
    assert not (folder / "model.safetensors").exists()
    assert (folder / "model.safetensors.index.json").is_file()
    ids = make_ids()
    assert_close(full_logits(ssmblocks.from_pretrained(folder), ids), full_logits(second, ids), 1e-6, "re-saved")


@pytest.mark.parametrize("first, second", [("ssmblocks", "hf"), ("hf", "ssmblocks")])
def test_resave_in_the_other_format_loads_the_new_checkpoint(tmp_path, first, second):
    folder = tmp_path / "ckpt"
    ssmblocks.save_pretrained(_model(seed=1), folder, format=first)
    newer = _model(seed=2)
    ssmblocks.save_pretrained(newer, folder, format=second)
    ids = make_ids()
    assert_close(full_logits(ssmblocks.from_pretrained(folder), ids), full_logits(newer, ids), 1e-6, "re-saved")


def test_saving_onto_a_file_is_an_error(tmp_path):
    (tmp_path / "ckpt").write_text("not a folder")
    with pytest.raises(ssmblocks.CheckpointError, match="not a folder"):
        ssmblocks.save_pretrained(_model(seed=1), tmp_path / "ckpt")
    assert (tmp_path / "ckpt").read_text() == "not a folder"
    assert _leftovers(tmp_path, tmp_path / "ckpt") == []


def test_save_does_not_change_the_model(tmp_path):
    model = _model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ssmblocks.save_pretrained(model, tmp_path / "ckpt", max_shard_size=SMALL_SHARDS)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
