"""Hostile or mistaken recipes are refused by name before anything large is built: alias bombs and cycles,
sizes beyond the documented limits, pattern repetitions, paths that are not recipe files."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ssmblocks.recipe import MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, Recipe

BASE = {
    "name": "t",
    "vocab_size": 97,
    "d_model": 32,
    "n_layers": 2,
    "mixers": {"m": {"kind": "ssd", "d_state": 8, "head_dim": 8}},
    "pattern": "m m",
}


def _alias_bomb(levels: int = 9) -> str:
    """Under a kilobyte of YAML whose aliases expand to 10**levels unknown fields."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    body = "\n  ".join(lines)
    return f"name: bomb\nvocab_size: 97\nd_model: 32\nn_layers: 1\nmixers:\n  {body}\npattern: m\n"


def test_alias_bomb_is_refused_quickly():
    text = _alias_bomb()
    assert len(text) < 1024
    start = time.perf_counter()
    with pytest.raises(ValueError, match="more than 100,000 values once its aliases are expanded"):
        Recipe.from_yaml(text)
    assert time.perf_counter() - start < 5


def test_recursive_alias_is_refused():
    with pytest.raises(ValueError, match="aliases are expanded"):
        Recipe.from_yaml("name: &n [*n]\nvocab_size: 97\n")


def test_recipe_with_a_few_aliases_still_loads():
    text = "name: t\nvocab_size: 97\nd_model: 32\nn_layers: 2\nmixers: {m: &ssd {kind: ssd, d_state: 8, head_dim: 8}, "
    text += "n: *ssd}\npattern: m n\n"
    assert Recipe.from_yaml(text).layers == ["m", "n"]


@pytest.mark.parametrize(
    "field, value, limit",
    [
        ("vocab_size", 10**12, MAX_VOCAB),
        ("d_model", 10**9, MAX_WIDTH),
        ("n_layers", 10**10, MAX_LAYERS),
        ("mixers.m.d_state", 10**8, 2**12),
        ("mixers.m.expand", 10**6, 64),
        ("pad_vocab_size_multiple", 10**12, 2**16),
    ],
)
def test_sizes_beyond_the_limits_name_the_field(field, value, limit):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    *path, leaf = field.split(".")
    target = data
    for key in path:
        target = target[key]
    target[leaf] = value
    loc = field.replace("mixers.m.", "mixers.m.ssd.")  # pydantic names the kind it validated against
    with pytest.raises(ValidationError, match=rf"{loc}\n  Input should be less than or equal to {limit}"):
        Recipe.model_validate(data)


@pytest.mark.parametrize("pattern", ["m*1000000000000", "(m*1000)*1000", "(m m)*2049", "m*" + "9" * 5000])
def test_pattern_repeating_past_the_layer_limit_is_refused(pattern):
    with pytest.raises(ValidationError, match=rf"more than MAX_LAYERS={MAX_LAYERS} layers|Exceeds the limit"):
        Recipe.model_validate({**BASE, "pattern": pattern})


def test_recipe_file_with_another_suffix_is_read_as_a_file(tmp_path: Path):
    path = tmp_path / "recipe.txt"
    path.write_text(yaml.safe_dump(BASE))
    assert Recipe.from_yaml(str(path)).d_model == 32


@pytest.mark.parametrize("name", ["recipes/missing.txt", "model.json", "some/folder/"])
def test_missing_recipe_path_is_not_read_as_yaml_text(name):
    with pytest.raises(FileNotFoundError, match=f"recipe file '{name}' does not exist"):
        Recipe.from_yaml(name)


def test_recipe_path_that_is_a_folder(tmp_path: Path):
    with pytest.raises(ValueError, match="not a regular file"):
        Recipe.from_yaml(str(tmp_path))


def test_recipe_path_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path):
    os.mkfifo(tmp_path / "recipe.yaml")

    def hung(*_):
        raise AssertionError("blocked reading a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match="not a regular file"):
            Recipe.from_yaml(tmp_path / "recipe.yaml")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_error_message_of_many_unknown_fields_is_bounded():
    text = yaml.safe_dump(BASE) + "".join(f"unknown_{i}: 1\n" for i in range(5000))
    with pytest.raises(ValidationError, match="and 4980 more errors, not shown") as info:
        Recipe.from_yaml(text)
    message = str(info.value)
    assert "unknown_0\n  Extra inputs are not permitted" in message and len(message) < 10_000


def test_error_message_of_a_few_problems_lists_them_all():
    text = yaml.safe_dump({**BASE, "d_model": 0, "vocab_size": -1})
    with pytest.raises(ValidationError, match="2 validation errors") as info:
        Recipe.from_yaml(text)
    assert "d_model" in str(info.value) and "vocab_size" in str(info.value) and "more errors" not in str(info.value)
