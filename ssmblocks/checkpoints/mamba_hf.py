"""Hugging Face Mamba (``state-spaces/mamba-*-hf``, transformers' MambaForCausalLM)."""

from __future__ import annotations

from ..errors import CheckpointError
from ..recipe import Recipe
from .family import Family, check_config, layer_count, mixer_kinds, refuse_unsupported, require, size, used_specs
from .keymap import KeyMap

KEYS = KeyMap(
    [
        ("embedding.weight", "backbone.embeddings.weight"),
        ("norm_f.weight", "backbone.norm_f.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("layers.{i}.{rest}", "backbone.layers.{i}.{rest}"),  # norm, mixer.* keep their names
    ]
)


def to_recipe(config: dict, shapes) -> Recipe:
    refuse_unsupported(config, "HF Mamba", hidden_act=("silu",))
    d = size(config, "hidden_size", "HF Mamba")
    expand = config.get("expand", 2)
    check_config("intermediate_size", config.get("intermediate_size"), expand * d, "expand * hidden_size")
    mixer = {
        "kind": "selective_ssm",
        "d_state": config.get("state_size", 16),
        "d_conv": config.get("conv_kernel", 4),
        "expand": expand,
        "dt_rank": config.get("time_step_rank", "auto"),
        "dt_min": config.get("time_step_min", 0.001),
        "dt_max": config.get("time_step_max", 0.1),
        "dt_init_floor": config.get("time_step_floor", 1e-4),
        "conv_bias": config.get("use_conv_bias", True),
        "bias": config.get("use_bias", False),
    }
    n = layer_count(config, "num_hidden_layers", "HF Mamba")
    return Recipe(
        name=config.get("_name_or_path") or "mamba",
        vocab_size=require(config, "vocab_size", "HF Mamba"),
        d_model=d,
        n_layers=n,
        tie_embeddings=config.get("tie_word_embeddings", True),
        residual_in_fp32=config.get("residual_in_fp32", True),
        norm={"eps": config.get("layer_norm_epsilon", 1e-5)},
        mixers={"m": mixer},
        pattern=["m"] * n,
    )


def to_config(recipe: Recipe) -> dict:
    specs = used_specs(recipe, "selective_ssm")
    if mixer_kinds(recipe) != {"selective_ssm"} or len(specs) != 1 or recipe.mlp is not None:
        raise CheckpointError("HF Mamba holds one kind of SelectiveSSM block, no MLP; save as format='ssmblocks'")
    (spec,) = specs
    return {
        "model_type": "mamba",
        "architectures": ["MambaForCausalLM"],
        "vocab_size": recipe.padded_vocab_size,
        "hidden_size": recipe.d_model,
        "num_hidden_layers": recipe.n_layers,
        "state_size": spec.d_state,
        "conv_kernel": spec.d_conv,
        "expand": spec.expand,
        "intermediate_size": spec.expand * recipe.d_model,
        "time_step_rank": spec.dt_rank,
        "time_step_min": spec.dt_min,
        "time_step_max": spec.dt_max,
        "time_step_floor": spec.dt_init_floor,
        "use_bias": spec.bias,
        "use_conv_bias": spec.conv_bias,
        "layer_norm_epsilon": recipe.norm.eps,
        "residual_in_fp32": recipe.residual_in_fp32,
        "tie_word_embeddings": recipe.tie_embeddings,
        "hidden_act": "silu",
    }


FAMILY = Family(
    name="HF Mamba",
    keys=KEYS,
    matches=lambda config, shapes: config.get("model_type") == "mamba",
    to_recipe=to_recipe,
    to_config=to_config,
)
