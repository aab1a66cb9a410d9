"""The shipped recipes of the published checkpoints agree with what the mappers read from those checkpoints'
configs: a recipe written out as its family's config.json and read back is the same recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssmblocks import Recipe
from ssmblocks.checkpoints import bamba_hf, mamba2_hf, mamba_hf

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FAMILIES = {"mamba-": mamba_hf, "mamba2-": mamba2_hf, "codestral-": mamba2_hf, "bamba-": bamba_hf}
SHIPPED = sorted(
    (path.stem, family)
    for path in RECIPES.glob("*.yaml")
    for prefix, family in FAMILIES.items()
    if path.stem.startswith(prefix) and not (prefix == "mamba-" and path.stem.startswith("mamba2-"))
)


@pytest.mark.parametrize(("name", "family"), SHIPPED, ids=[name for name, _ in SHIPPED])
def test_recipe_survives_its_family_config(name, family):
    recipe = Recipe.from_yaml(RECIPES / f"{name}.yaml")
    back = family.to_recipe(family.to_config(recipe), None)
    same = {"name", "vocab_size", "pad_vocab_size_multiple", "pattern"}  # written in another form, compared below
    assert back.model_dump(exclude=same) == recipe.model_dump(exclude=same)
    assert back.layers == recipe.layers and back.padded_vocab_size == recipe.padded_vocab_size
