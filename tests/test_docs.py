"""The README's snippets and the examples run as documented; its recipe reference is the schema's.

``python tests/test_docs.py`` rewrites the README's recipe reference from the schema."""

import math
import re
import runpy
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
SKIP = "<!-- skip-test"
REFERENCE_START, REFERENCE_END = "<!-- recipe-reference: start -->", "<!-- recipe-reference: end -->"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block not marked with a ``<!-- skip-test ... -->`` line just
    before it."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if not before.startswith(SKIP):
            blocks.append((text.count("\n", 0, match.start()) + 2, match.group(1)))
    return blocks


def test_readme_snippets_run(tmp_path, monkeypatch):
    """Every ```python block runs as it stands, in order, sharing one namespace as a reader's session would,
    from a folder other than the repository's."""
    text = (ROOT / "README.md").read_text()
    blocks = python_blocks(text)
    assert len(blocks) >= 6, "README has too few python snippets"
    assert text.count(SKIP) <= 1, "keep the snippets that the test skips few"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for line, block in blocks:
        exec(compile("\n" * (line - 1) + block, "README.md", "exec"), namespace)


def test_skip_marker_skips_only_the_next_block():
    text = "```python\na = 1\n```\n<!-- skip-test: hub -->\n```python\nb = 2\n```\n```python\nc = 3\n```\n"
    assert [code for _, code in python_blocks(text)] == ["a = 1\n", "c = 3\n"]


def _value(value) -> str:
    """A default as it would be written in YAML."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and math.isinf(value):
        return ".inf"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def recipe_reference() -> str:
    """The README's recipe reference: one table per part of a recipe, from the schema's field descriptions."""
    from ssmblocks import recipe as r

    parts = [
        ("top level", r.Recipe),
        ("`mixers.NAME` with `kind: selective_ssm`", r.SelectiveSSMSpec),
        ("`mixers.NAME` with `kind: ssd`", r.SSDSpec),
        ("`mixers.NAME` with `kind: attention`", r.AttentionSpec),
        ("`mixers.NAME` with `kind: parallel`", r.ParallelSpec),
        ("`mlp`", r.SwiGLUSpec),
        ("`norm`", r.NormSpec),
        ("`pattern` as a default with overrides", r.PatternOverrides),
        ("`pattern` as a default with a period", r.PatternPeriodic),
    ]
    lines = []
    for title, spec in parts:
        lines += [f"**{title}**: {spec.__doc__.splitlines()[0]}", "", "| field | default | meaning |"]
        lines.append("|---|---|---|")
        for name, field in spec.model_fields.items():
            if field.default_factory is not None:
                default = f"`{_value(field.default_factory())}`"
            else:
                default = "required" if field.default is PydanticUndefined else f"`{_value(field.default)}`"
            lines.append(f"| `{name}` | {default} | {field.description} |")
        lines.append("")
    return "\n".join(lines)


def _readme_with_reference(text: str) -> str:
    start, end = text.index(REFERENCE_START) + len(REFERENCE_START), text.index(REFERENCE_END)
    return text[:start] + "\n" + recipe_reference() + "\n" + text[end:]


def test_readme_recipe_reference_is_the_schema():
    """Every recipe field's description, default and requiredness appear in the README as the schema has them
    (regenerate with ``python tests/test_docs.py``)."""
    text = (ROOT / "README.md").read_text()
    assert _readme_with_reference(text) == text, "README's recipe reference is stale: run python tests/test_docs.py"


def test_readme_test_command_is_what_ci_runs():
    readme_cmd = re.search(r"^(pip install .*pytest)\s", (ROOT / "README.md").read_text(), re.M).group(1)
    assert readme_cmd in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    "script, expect",
    [("quickstart.py", "decode"), ("build_a_hybrid.py", "streaming"), ("load_and_generate.py", "Mamba is")],
)
def test_example_runs(script, expect, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", [script, "--max-new-tokens", "4"] if script == "load_and_generate.py" else [script])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    assert expect in capsys.readouterr().out


LAYERS = ["SSD", "SelectiveSSM", "Attention", "CausalConv1d", "RMSNorm", "GatedRMSNorm", "SwiGLU"]


@pytest.mark.parametrize("name", LAYERS)
def test_help_documents_every_constructor_argument(name):
    import inspect
    import pydoc

    import ssmblocks

    layer = getattr(ssmblocks, name)
    args_section = layer.__doc__.split("Args:", 1)[1]
    documented = set(re.findall(r"^\s{8}(\w+(?:, \w+)*):", args_section, re.M))
    documented = {arg for entry in documented for arg in entry.split(", ")}
    assert documented == set(inspect.signature(layer).parameters), name
    assert "Initialize internal Module state" not in pydoc.render_doc(layer, renderer=pydoc.plaintext)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    readme = ROOT / "README.md"
    readme.write_text(_readme_with_reference(readme.read_text()))
