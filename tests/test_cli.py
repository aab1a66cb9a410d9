"""The ssmblocks command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ssmblocks
from ssmblocks.cli import info, main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The command in a fresh process, importing this checkout's ssmblocks, from the folder ``cwd``."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "ssmblocks.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path, **env},
        capture_output=True,
        text=True,
    )


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


def test_info_by_name_from_another_folder(tmp_path):
    result = run_cli(["info", "mamba2-130m"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == info(ssmblocks.Recipe.from_yaml(RECIPES / "mamba2-130m.yaml"), torch.bfloat16) + "\n"


def test_recipes_lists_every_shipped_name(capsys):
    main(["recipes"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == sorted(path.stem for path in RECIPES.glob("*.yaml"))


def test_generate_from_a_recipe_says_the_weights_are_random(capsys, tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    main(["generate", "--recipe", str(tmp_path / "tiny.yaml"), "--prompt", "Hi", "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert captured.out.startswith("Hi") and captured.out.endswith("\n")
    assert "random weights" in captured.err and "byte-level" in captured.err


def _tiny_checkpoint(folder: Path, tokenizer=None) -> ssmblocks.CausalLM:
    model = ssmblocks.build(ssmblocks.Recipe.from_yaml(TINY))
    model.tokenizer = tokenizer
    ssmblocks.save_pretrained(model, folder, format="ssmblocks")
    return model


def test_generate_from_a_checkpoint_streams_its_greedy_tokens_as_bytes(capsys, tmp_path):
    model = _tiny_checkpoint(tmp_path / "ckpt")
    main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "Hi", "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    new = ssmblocks.generate(model.eval(), torch.tensor([list(b"Hi")]), max_new_tokens=6)[0, 2:].tolist()
    assert captured.out == "Hi" + bytes(new).decode("utf-8", "replace") + "\n"
    assert "byte-level tokens (the checkpoint has no tokenizer.json)" in captured.err
    assert "random" not in captured.err


def test_generate_from_a_checkpoint_uses_its_tokenizer(capsys, tmp_path):
    from tests.checkpoints.builders import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = _tiny_checkpoint(tmp_path / "ckpt", tokenizer)
    main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "the mamba", "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    prompt = tokenizer.encode("the mamba").ids
    new = ssmblocks.generate(model.eval(), torch.tensor([prompt]), max_new_tokens=5)[0, len(prompt) :].tolist()
    assert captured.out == "the mamba" + tokenizer.decode(new) + "\n"
    assert captured.err == ""


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


@pytest.mark.parametrize("command", [["info"], ["generate", "--recipe"]])
def test_unknown_recipe_name_lists_close_matches(capsys, command):
    line = _error_line(capsys, [*command, "mamba2-13m"])
    assert "unknown recipe name 'mamba2-13m'; did you mean mamba2-130m" in line


def test_unknown_recipe_name_with_no_close_match_lists_every_name(capsys):
    line = _error_line(capsys, ["info", "llama"])
    assert all(path.stem in line for path in RECIPES.glob("*.yaml"))


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["generate", "--recipe", "mamba2-130m", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["generate", "--prompt", "x"], "one of the arguments --model --recipe is required"),
        (["generate", "--model", "m", "--recipe", "r"], "not allowed with argument"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["generate", "--model", "./no/such/folder"], "--model './no/such/folder': no such checkpoint folder"),
        (["generate", "--recipe", "mamba2-130m", "--device", "toaster"], "--device 'toaster'"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, fragment):
    assert fragment in _error_line(capsys, argv)


def test_generate_from_a_file_that_is_not_a_checkpoint_folder(capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    assert "is a file; pass the checkpoint's folder" in _error_line(
        capsys, ["generate", "--model", str(tmp_path / "weights.bin")]
    )


def test_invalid_recipe_is_one_line_naming_the_field(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text(TINY.replace("d_model: 32", "d_model: 0"))
    assert "d_model" in _error_line(capsys, ["info", str(tmp_path / "bad.yaml")])


def test_generate_with_a_byte_prompt_too_large_for_the_vocab(capsys, tmp_path):
    (tmp_path / "small.yaml").write_text(TINY.replace("vocab_size: 256", "vocab_size: 100"))
    line = _error_line(capsys, ["generate", "--recipe", str(tmp_path / "small.yaml"), "--prompt", "~~"])
    assert "a byte-level prompt needs vocab_size >= 256, but the model's vocab_size is 100" in line


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
    result = run_cli(["info", str(tmp_path / "missing.yaml")], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"ssmblocks: error: recipe file '{tmp_path / 'missing.yaml'}' does not exist\n"


def test_hub_id_that_cannot_be_downloaded_is_one_line(tmp_path):
    result = run_cli(["generate", "--model", "nobody/no-such-model"], cwd=tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssmblocks: error: 'nobody/no-such-model' is not a local folder")


def test_help_lists_the_commands_without_building_anything(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("recipes", "info", "generate", "convert"))


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
