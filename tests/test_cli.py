"""The ssmblocks command."""

import subprocess
import sys
from pathlib import Path

import pytest

from ssmblocks.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_info_prints_counts_table_and_sizes(capsys):
    main(["info", str(RECIPES / "bamba-9b.yaml")])
    out = capsys.readouterr().out
    assert "bamba-9b: 9,780,235,392 parameters" in out
    assert "    9  a        Attention" in out
    # 29 SSD layers: conv (b, 8192 + 2*128, 3) bf16 + ssm (128 heads, 64, 128) float32 = 4,244,992 bytes each;
    # 3 attention layers: pos + cursor (16 bytes) each
    assert f"state per sequence (SSM + conv, fixed): {29 * 4_244_992 + 3 * 16:,} bytes" in out
    # K and V: 2 * 8 kv heads * 128 head_dim * 2 bytes + 1 valid byte, per attention layer
    assert f"KV cache per token (attention layers): {3 * (2 * 8 * 128 * 2 + 1):,} bytes" in out


TINY = """
name: tiny
vocab_size: 256
d_model: 32
n_layers: 3
mixers:
  m: {kind: ssd, d_state: 8, head_dim: 16}
  a: {kind: attention, n_heads: 4}
pattern: m a m
"""


def test_generate_streams_bytes(capsys, tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    main(["generate", "--recipe", str(tmp_path / "tiny.yaml"), "--prompt", "Hi", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert out.startswith("Hi") and out.endswith("\n")


def _error_line(capsys, argv) -> str:
    """Run the command, expect exit status 2 and one stderr line 'ssmblocks: error: ...'; return that line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssmblocks: error: "), captured.err
    return lines[0]


def test_unknown_recipe_file_is_an_error(capsys):
    assert "recipe file 'no-such-recipe.yaml' does not exist" in _error_line(capsys, ["info", "no-such-recipe.yaml"])


def test_invalid_recipe_is_one_line_naming_the_field(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text(TINY.replace("d_model: 32", "d_model: 0"))
    assert "d_model" in _error_line(capsys, ["info", str(tmp_path / "bad.yaml")])


def test_generate_with_a_byte_prompt_too_large_for_the_vocab(capsys, tmp_path):
    (tmp_path / "small.yaml").write_text(TINY.replace("vocab_size: 256", "vocab_size: 100"))
    line = _error_line(capsys, ["generate", "--recipe", str(tmp_path / "small.yaml"), "--prompt", "~~"])
    assert "needs vocab_size >= 256" in line


@pytest.mark.parametrize("dst", ["", "  "])
def test_convert_into_an_empty_path_is_refused(capsys, tmp_path, monkeypatch, dst):
    monkeypatch.chdir(tmp_path)
    assert "DST is an empty path" in _error_line(capsys, ["convert", str(tmp_path / "src"), dst, "--to", "hf"])
    assert list(tmp_path.iterdir()) == []


def test_convert_from_a_broken_checkpoint_is_one_line(capsys, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    line = _error_line(capsys, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "hf"])
    assert "no weights found" in line and not (tmp_path / "dst").exists()


def test_installed_command_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ssmblocks.cli", "info", str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr == f"ssmblocks: error: recipe file '{tmp_path / 'missing.yaml'}' does not exist\n"


def test_convert_hf_to_ssmblocks_and_back(tmp_path, capsys):
    import torch

    import ssmblocks

    recipe = ssmblocks.Recipe.from_yaml(
        TINY.replace("m a m", "m m m").replace("  a: {kind: attention, n_heads: 4}\n", "")
    )
    model = ssmblocks.build(recipe)
    ssmblocks.save_pretrained(model, tmp_path / "hf", format="hf")
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "native"), "--to", "ssmblocks", "--max-shard-size", "4000"])
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "native" / "model.safetensors.index.json").is_file()
    main(["convert", str(tmp_path / "native"), str(tmp_path / "hf2"), "--to", "hf"])
    ids = torch.randint(0, 256, (1, 6))
    back = ssmblocks.from_pretrained(tmp_path / "hf2")
    assert torch.equal(back(ids).logits, model(ids).logits)
