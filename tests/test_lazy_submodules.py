"""`import ssmblocks` makes the optional submodules reachable as attributes without importing them up front."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("name", ["allocator", "distributed", "quantization", "training"])
def test_submodule_is_reachable_and_imported_only_on_use(name):
    code = (
        "import sys, ssmblocks\n"
        f"assert 'ssmblocks.{name}' not in sys.modules\n"
        f"assert ssmblocks.{name}.__name__ == 'ssmblocks.{name}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_leaves_torch_distributed_tensor_unimported():
    """torch.distributed.tensor takes about a second to import; only ssmblocks.distributed needs it."""
    code = (
        "import sys, torch, ssmblocks\n"
        "recipe = ssmblocks.Recipe.from_name('mamba2-130m').model_copy(update={'n_layers': 1, 'vocab_size': 256})\n"
        "model = ssmblocks.build(recipe)\n"
        "ssmblocks.training.param_groups(model, 0.1)\n"
        "assert 'torch.distributed.tensor' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_attribute_is_an_attribute_error():
    import ssmblocks

    with pytest.raises(AttributeError, match="no_such_thing"):
        ssmblocks.no_such_thing  # noqa: B018
