"""Recipes: every shipped YAML validates, round-trips and builds; full-size parameter counts match the published
models and transformers' implementations; every pattern form means the same layers; bad recipes fail with a
message that names the field."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

import ssmblocks
from ssmblocks import Recipe, build
from ssmblocks.model import ParallelMixers, build_mixer
from tests.helpers import assert_close

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
RECIPE_IDS = [p.stem for p in RECIPES]


def load(name: str) -> Recipe:
    return Recipe.from_yaml(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml")


# ------------------------------------------------------------------------------------- shipped recipes


def test_recipes_found():
    assert len(RECIPES) >= 15, [p.name for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=RECIPE_IDS)
def test_recipe_round_trips(path: Path):
    recipe = Recipe.from_yaml(path)
    assert recipe.name == path.stem
    assert len(recipe.layers) == recipe.n_layers
    text = recipe.to_yaml()
    again = Recipe.from_yaml(text)
    assert again == recipe
    assert again.layers == recipe.layers
    assert again.to_yaml() == text, "to_yaml is not stable under a reload"


def shrink(recipe: Recipe, max_layers: int = 8) -> Recipe:
    """The same architecture at toy size: d_model 64, small heads and states, at most ``max_layers`` layers.

    The layers are a prefix of the recipe's, with the last ones swapped for any mixer the prefix left out
    (Bamba's first attention layer is layer 9), so every mixer the full model uses is built and run.
    """
    data = recipe.model_dump()
    layers = recipe.layers[:max_layers]
    missing = [name for name in dict.fromkeys(recipe.layers) if name not in layers]
    if missing:
        layers = layers[: len(layers) - len(missing)] + missing
    data.update(d_model=64, vocab_size=257, n_layers=len(layers), pattern=layers)
    if data["mlp"] is not None:
        data["mlp"]["hidden_dim"] = 128
    for spec in data["mixers"].values():
        if "d_state" in spec:
            spec["d_state"] = min(spec["d_state"], 16)
        if spec["kind"] == "ssd":
            spec.update(head_dim=16, chunk_size=4)
        if spec["kind"] == "attention":
            spec["n_heads"] = 4
            if spec["n_kv_heads"] is not None:
                spec["n_kv_heads"] = 2
            if spec["head_dim"] is not None:
                spec["head_dim"] = 16
    return Recipe.model_validate(data)


@pytest.mark.parametrize("path", RECIPES, ids=RECIPE_IDS)
def test_recipe_builds_and_runs_shrunken(path: Path):
    recipe = Recipe.from_yaml(path)
    small = shrink(recipe)
    assert set(small.layers) == set(recipe.layers)
    model = build(small).eval()
    assert [block.mixer_name for block in model.layers] == small.layers
    ids = torch.randint(0, small.vocab_size, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 7, small.vocab_size)
    assert torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    "name, published",
    [
        pytest.param("mamba-130m", 129.1e6, id="mamba-130m"),  # state-spaces/mamba-130m(-hf): 129,135,360
        pytest.param("codestral-7b", 7_285_403_648, id="codestral-7b"),  # Mamba-Codestral-7B-v0.1 card
        pytest.param("bamba-9b", 9.78e9, id="bamba-9b"),  # ibm-ai-platform/Bamba-9B
    ],
)
def test_full_size_parameter_count_matches_published(name: str, published: float):
    n = build(load(name), device="meta").num_parameters()
    assert abs(n - published) / published < 0.005, f"{name}: {n:,} parameters, published {published:,.0f}"


# Published configs (d_model, n_layers) of state-spaces/mamba-* and mamba2-*, kept here rather than read from
# our recipes so that transformers' model is an independent oracle for both the recipe and the build.
MAMBA1 = {
    "mamba-130m": (768, 24),
    "mamba-370m": (1024, 48),
    "mamba-790m": (1536, 48),
    "mamba-1.4b": (2048, 48),
    "mamba-2.8b": (2560, 64),
}
MAMBA2 = {
    "mamba2-130m": (768, 24),
    "mamba2-370m": (1024, 48),
    "mamba2-780m": (1536, 48),
    "mamba2-1.3b": (2048, 48),
    "mamba2-2.7b": (2560, 64),
}


def hf_config(name: str):
    """transformers' config of the published model ``name``."""
    transformers = pytest.importorskip("transformers")
    if name in MAMBA1:
        d, n = MAMBA1[name]
        return transformers.MambaConfig(
            hidden_size=d,
            num_hidden_layers=n,
            vocab_size=50280,  # 50277 padded to a multiple of 8
            state_size=16,
            expand=2,
            conv_kernel=4,
            use_bias=False,
            use_conv_bias=True,
            time_step_rank=math.ceil(d / 16),
            tie_word_embeddings=True,
        )
    if name in MAMBA2 or name == "codestral-7b":
        codestral = name == "codestral-7b"
        d, n = (4096, 64) if codestral else MAMBA2[name]
        return transformers.Mamba2Config(
            hidden_size=d,
            num_hidden_layers=n,
            vocab_size=32768 if codestral else 50288,  # 50277 padded to a multiple of 16
            num_heads=2 * d // 64,
            head_dim=64,
            n_groups=8 if codestral else 1,
            state_size=128,
            expand=2,
            conv_kernel=4,
            use_bias=False,
            use_conv_bias=True,
            tie_word_embeddings=not codestral,
        )
    assert name == "bamba-9b", name
    return transformers.BambaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        attn_layer_indices=[9, 18, 27],
        mamba_n_heads=128,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=128,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
    )


def test_every_published_recipe_has_an_oracle():
    published = [p.stem for p in RECIPES if p.stem.startswith(("mamba", "codestral", "bamba"))]
    assert sorted(published) == sorted([*MAMBA1, *MAMBA2, "codestral-7b", "bamba-9b"])


@pytest.mark.parametrize("name", [*MAMBA1, *MAMBA2, "codestral-7b", "bamba-9b"])
def test_parameters_match_transformers(name: str):
    config = hf_config(name)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        theirs = AutoModelForCausalLM.from_config(config)
    ours = build(load(name), device="meta")
    # parameters() yields a tied weight once, so both counts count the shared embedding once
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert ours.num_parameters() == n_theirs, f"{name}: ours {ours.num_parameters():,}, transformers {n_theirs:,}"
    # the same tensors, not just the same total
    assert sorted(tuple(p.shape) for p in ours.parameters()) == sorted(tuple(p.shape) for p in theirs.parameters())


# -------------------------------------------------------------------------------------------- patterns

TINY_MIXERS = {
    "s": {"kind": "selective_ssm", "d_state": 4},
    "m": {"kind": "ssd", "d_state": 8, "head_dim": 16, "chunk_size": 4},
    "a": {"kind": "attention", "n_heads": 2, "n_kv_heads": 1},
}


def tiny(pattern, n_layers: int = 8, mixers: dict | None = None) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "tiny",
            "vocab_size": 257,
            "d_model": 32,
            "n_layers": n_layers,
            "mixers": copy.deepcopy(TINY_MIXERS) if mixers is None else mixers,
            "mlp": {"hidden_dim": 48},
            "pattern": pattern,
        }
    )


MMMA_TWICE = ["m", "m", "m", "a", "m", "m", "m", "a"]


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param(MMMA_TWICE, id="list"),
        pytest.param("m*3 a m*3 a", id="string"),
        pytest.param("m m m a m m m a", id="string-spaced"),
        pytest.param("(m*3 a)*2", id="groups"),
        pytest.param("((m)*3 (a))*2", id="nested-groups"),
        pytest.param("mmmammma", id="letters"),
        pytest.param("(mmma)*2", id="letters-in-group"),
        pytest.param({"default": "m", "at": {3: "a", 7: "a"}}, id="overrides"),
        pytest.param({"default": "m", "every": 4, "offset": 3, "use": "a"}, id="periodic"),
    ],
)
def test_pattern_forms_normalise_to_the_same_layers(pattern):
    recipe = tiny(pattern)
    assert recipe.layers == MMMA_TWICE
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert [block.mixer_name for block in build(recipe, device="meta").layers] == MMMA_TWICE


def test_pattern_with_multi_letter_names():
    mixers = {"ssd": TINY_MIXERS["m"], "attn": TINY_MIXERS["a"]}
    recipe = tiny("(ssd*3 attn)*2", mixers=mixers)
    assert recipe.layers == ["ssd", "ssd", "ssd", "attn"] * 2


@pytest.mark.parametrize("members", [("m", "a"), ("s", "m", "a")], ids=["ssd+attention", "ssm+ssd+attention"])
def test_parallel_mixer_is_the_sum_of_its_members(members):
    mixers = {**copy.deepcopy(TINY_MIXERS), "p": {"kind": "parallel", "mixers": list(members)}}
    recipe = tiny(["m", "p"], n_layers=2, mixers=mixers)
    model = build(recipe).eval()
    parallel = model.layers[1].mixer
    assert isinstance(parallel, ParallelMixers)
    assert list(parallel.mixers) == list(members)

    x = torch.randn(2, 7, recipe.d_model)
    expected = 0
    for name in members:
        alone = build_mixer(name, recipe).eval()
        alone.load_state_dict(parallel.mixers[name].state_dict())
        with torch.no_grad():
            expected = expected + alone(x)
    with torch.no_grad():
        out = parallel(x)
    assert_close(out, expected, 1e-6, "parallel")


# ---------------------------------------------------------------------------------------- invalid recipes

BASE = {
    "name": "base",
    "vocab_size": 257,
    "d_model": 64,
    "n_layers": 4,
    "mixers": {
        "s": {"kind": "selective_ssm", "d_state": 8},
        "m": {"kind": "ssd", "d_state": 16, "head_dim": 16},  # inner 128: 8 heads
        "a": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
        "p": {"kind": "parallel", "mixers": ["m", "a"]},
    },
    "mlp": {"hidden_dim": 128},
    "pattern": "s m a p",
}
DELETE = object()


def edited(edits: dict) -> dict:
    """BASE with ``{"dotted.path": value}`` edits applied (DELETE removes the key)."""
    data = copy.deepcopy(BASE)
    for path, value in edits.items():
        *parents, key = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return data


def message(*fragments: str) -> str:
    """A regex for a message holding every fragment, in order, across lines."""
    return "(?s)" + ".*".join(re.escape(f) for f in fragments)


def test_base_is_valid():
    assert Recipe.model_validate(BASE).layers == ["s", "m", "a", "p"]


def case(case_id: str, edits: dict, fragments: list[str]):
    """One invalid recipe: BASE with ``edits``, whose error message must hold ``fragments`` in order."""
    return pytest.param(edits, fragments, id=case_id)


INVALID = [
    # mixer kinds and unknown fields
    case("unknown-mixer-kind", {"mixers.m.kind": "mamba3"}, ["mixers.m", "'mamba3'", "does not match"]),
    case("typo-top-level", {"d_modle": 64}, ["d_modle", "Extra inputs are not permitted"]),
    case("typo-in-mixer", {"mixers.m.d_sate": 16}, ["mixers.m.ssd.d_sate", "Extra inputs are not permitted"]),
    case("typo-in-attention", {"mixers.a.n_kv_head": 2}, ["mixers.a.attention.n_kv_head", "Extra inputs"]),
    case("typo-in-mlp", {"mlp.hiden_dim": 128}, ["mlp.hiden_dim", "Extra inputs are not permitted"]),
    case("typo-in-pattern-mapping", {"pattern": {"default": "m", "evry": 2, "use": "a"}}, ["pattern", "evry"]),
    case("unknown-norm-kind", {"norm": {"kind": "layernorm"}}, ["norm.kind", "'rmsnorm'", "'layernorm'"]),
    case("unknown-mlp-kind", {"mlp.kind": "gelu"}, ["mlp.kind", "'swiglu'", "'gelu'"]),
    case("missing-d_model", {"d_model": DELETE}, ["d_model", "Field required"]),
    case("no-mixers", {"mixers": {}}, ["mixers", "at least 1"]),
    case("mixer-name-not-identifier", {"mixers.m-1": {"kind": "ssd"}}, ["mixer name 'm-1'", "identifier"]),
    # sizes
    case("d_model-zero", {"d_model": 0}, ["d_model", "greater than 0", "input_value=0"]),
    case("d_model-not-a-number", {"d_model": "big"}, ["d_model", "valid integer", "'big'"]),
    case("n_layers-negative", {"n_layers": -1}, ["n_layers", "greater than 0", "input_value=-1"]),
    case("vocab_size-zero", {"vocab_size": 0}, ["vocab_size", "greater than 0"]),
    case("ssd-d_state-zero", {"mixers.m.d_state": 0}, ["mixers.m.ssd.d_state", "greater than 0"]),
    case("ssm-d_state-zero", {"mixers.s.d_state": 0}, ["mixers.s.selective_ssm.d_state", "greater than 0"]),
    case("ssd-chunk_size-zero", {"mixers.m.chunk_size": 0}, ["mixers.m.ssd.chunk_size", "greater than 0"]),
    case("mlp-hidden_dim-zero", {"mlp.hidden_dim": 0}, ["mlp.hidden_dim", "greater than 0", "input_value=0"]),
    # heads and groups
    case("heads-not-dividing-d_model", {"mixers.a.n_heads": 6}, ["mixers.a.n_heads=6", "must divide d_model=64"]),
    case("kv-heads-not-dividing-heads", {"mixers.a.n_kv_heads": 3}, ["mixers.a.n_kv_heads=3", "mixers.a.n_heads=4"]),
    case("kv-heads-above-heads", {"mixers.a.n_kv_heads": 8}, ["mixers.a.n_kv_heads=8", "mixers.a.n_heads=4"]),
    case("ssd-head_dim-not-dividing", {"mixers.m.head_dim": 24}, ["mixers.m.head_dim=24", "expand * d_model = 128"]),
    case("ssd-n_groups-not-dividing", {"mixers.m.n_groups": 3}, ["mixers.m.n_groups=3", "number of heads 8"]),
    # ranges
    case(
        "rotary_fraction-above-1",
        {"mixers.a.rotary_fraction": 1.5},
        ["mixers.a.attention.rotary_fraction", "less than or equal to 1", "input_value=1.5"],
    ),
    case(
        "rotary_fraction-negative",
        {"mixers.a.rotary_fraction": -0.5},
        ["mixers.a.attention.rotary_fraction", "greater than or equal to 0", "input_value=-0.5"],
    ),
    case("ssd-dt_min-above-dt_max", {"mixers.m.dt_min": 0.2}, ["mixers.m.dt_min=0.2", "mixers.m.dt_max=0.1"]),
    case("ssm-dt_min-above-dt_max", {"mixers.s.dt_min": 0.2}, ["mixers.s.dt_min=0.2", "mixers.s.dt_max=0.1"]),
    case("ssd-dt_limit-reversed", {"mixers.m.dt_limit": [0.1, 0.01]}, ["mixers.m.dt_limit=(0.1, 0.01)"]),
    # parallel
    case("parallel-undefined-member", {"mixers.p.mixers": ["m", "x"]}, ["mixers.p.mixers[1]='x'", "not a mixer"]),
    case(
        "parallel-of-parallel",
        {"mixers.q": {"kind": "parallel", "mixers": ["m", "a"]}, "mixers.p.mixers": ["m", "q"]},
        ["mixers.p.mixers[1]='q'", "itself parallel"],
    ),
    case("parallel-one-member", {"mixers.p.mixers": ["m"]}, ["mixers.p.parallel.mixers", "at least 2"]),
    case(
        "parallel-duplicate-member",
        {"mixers.p.mixers": ["m", "m"]},
        ["mixers.p.mixers", "'m'"],
    ),
    # patterns naming undefined mixers
    case("string-undefined-mixer", {"pattern": "s m x p"}, ["pattern 's m x p'", "'x'", "not defined"]),
    case("letters-undefined-mixer", {"pattern": "smxp"}, ["pattern 'smxp'", "'x'", "not defined"]),
    case("list-undefined-mixer", {"pattern": ["s", "m", "x", "p"]}, ["pattern[2]", "'x'", "not defined"]),
    case("overrides-undefined-default", {"pattern": {"default": "x", "at": {1: "a"}}}, ["pattern.default", "'x'"]),
    case("overrides-undefined-at", {"pattern": {"default": "m", "at": {1: "x"}}}, ["pattern.at[1]", "'x'"]),
    case(
        "periodic-undefined-default", {"pattern": {"default": "x", "every": 2, "use": "a"}}, ["pattern.default", "'x'"]
    ),
    case("periodic-undefined-use", {"pattern": {"default": "m", "every": 2, "use": "x"}}, ["pattern.use", "'x'"]),
    case(
        "string-misspelt-long-name",
        {"pattern": "s m atn p"},
        ["pattern", "'atn'"],
    ),
    # pattern length and indices
    case("pattern-too-short", {"pattern": "s m a"}, ["pattern gives 3 layers", "n_layers=4"]),
    case("pattern-too-long", {"pattern": "(s m a p)*2"}, ["pattern gives 8 layers", "n_layers=4"]),
    case("n_layers-mismatch", {"n_layers": 5}, ["pattern gives 4 layers", "n_layers=5"]),
    case("pattern-empty-list", {"pattern": []}, ["pattern gives 0 layers", "n_layers=4"]),
    case("overrides-index-too-big", {"pattern": {"default": "m", "at": {4: "a"}}}, ["pattern.at", "index 4", "0..3"]),
    case(
        "overrides-index-negative", {"pattern": {"default": "m", "at": {-1: "a"}}}, ["pattern.at", "index -1", "0..3"]
    ),
    case(
        "periodic-offset-not-below-every",
        {"pattern": {"default": "m", "every": 2, "offset": 2, "use": "a"}},
        ["pattern", "offset=2 must be smaller than every=2"],
    ),
    case(
        "periodic-every-zero",
        {"pattern": {"default": "m", "every": 0, "use": "a"}},
        ["pattern", "every", "greater than 0", "input_value=0"],
    ),
    # malformed pattern strings
    case("string-star-without-count", {"pattern": "s m a p*"}, ["pattern 's m a p*'", "positive count"]),
    case("string-star-zero", {"pattern": "s m a p*0"}, ["pattern 's m a p*0'", "positive count"]),
    case("string-star-negative", {"pattern": "s m a p*-1"}, ["pattern 's m a p*-1'", "positive count"]),
    case("string-unclosed-group", {"pattern": "(s m a p"}, ["pattern '(s m a p'", "'(' without a matching ')'"]),
    case("string-unopened-group", {"pattern": "s m a p)"}, ["pattern 's m a p)'", "')' without a matching '('"]),
    case("string-unexpected-character", {"pattern": "s m + a p"}, ["pattern 's m + a p'", "unexpected '+'"]),
    case("string-empty", {"pattern": ""}, ["pattern is empty"]),
]


@pytest.mark.parametrize("edits, fragments", INVALID)
def test_invalid_recipe(edits: dict, fragments: list[str]):
    with pytest.raises(ValidationError, match=message(*fragments)):
        Recipe.model_validate(edited(edits))


def test_invalid_yaml_file_names_the_field(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(edited({"mixers.a.n_kv_heads": 3})))
    with pytest.raises(ValidationError, match=message("mixers.a.n_kv_heads=3", "mixers.a.n_heads=4")):
        Recipe.from_yaml(path)
    with pytest.raises(ValidationError, match=message("mixers.a.n_kv_heads=3")):
        Recipe.from_yaml(str(path))


NOT_A_MAPPING = [
    pytest.param("- m\n- a\n", "list", id="list"),
    pytest.param("just text", "str", id="scalar"),
    pytest.param("", "NoneType", id="empty"),
]


@pytest.mark.parametrize("text, kind", NOT_A_MAPPING)
def test_yaml_not_a_mapping_is_a_validation_error(text: str, kind: str):
    with pytest.raises(ValidationError, match=kind):
        Recipe.from_yaml(text)


# ------------------------------------------------------------------------------------------- from_yaml


def test_from_yaml_accepts_path_str_and_text(tmp_path: Path):
    recipe = Recipe.model_validate(BASE)
    path = tmp_path / "base.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path) == Recipe.from_yaml(str(path)) == Recipe.from_yaml(recipe.to_yaml()) == recipe
    one_line = yaml.safe_dump(BASE, default_flow_style=True, width=math.inf).strip()
    assert "\n" not in one_line and len(one_line) > 255  # longer than a file name may be
    assert Recipe.from_yaml(one_line) == recipe


def test_round_trip_keeps_non_default_values():
    data = edited(
        {
            "pad_vocab_size_multiple": 8,
            "tie_embeddings": False,
            "residual_in_fp32": False,
            "norm": {"eps": 1e-6},
            "mixers.m.dt_limit": [0.001, math.inf],
            "mixers.m.D_has_hdim": True,
            "mixers.m.norm_before_gate": True,
            "mixers.s.dt_rank": 7,
            "mixers.a.rotary_fraction": 0.0,
            "mixers.a.head_dim": 8,
            "mlp.bias": True,
            "pattern": {"default": "m", "at": {0: "s", 3: "p"}},
        }
    )
    recipe = Recipe.model_validate(data)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert recipe.mixers["m"].dt_limit == (0.001, math.inf)


def test_from_yaml_missing_file():
    with pytest.raises(FileNotFoundError, match="recipe file 'no-such-recipe.yaml' does not exist"):
        Recipe.from_yaml("no-such-recipe.yaml")


def test_public_names():
    assert ssmblocks.Recipe is Recipe
    assert ssmblocks.build is build
