"""The README's snippets and the demo run as documented."""

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_snippets_run():
    """Every ```python block runs (```py marks snippets that need a hub download or files)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python snippets"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


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
