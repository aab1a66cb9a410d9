"""Hugging Face Mamba2 (transformers' Mamba2ForCausalLM; Mamba-Codestral-7B)."""

from __future__ import annotations

from ..errors import CheckpointError
from ..recipe import Recipe
from .family import (
    Family,
    dt_limit,
    layer_count,
    limit_entry,
    mixer_kinds,
    refuse_unsupported,
    require,
    size,
    used_specs,
)
from .mamba_hf import KEYS  # same key layout as HF Mamba


def to_recipe(config: dict, shapes) -> Recipe:
    refuse_unsupported(config, "HF Mamba2", hidden_act=("silu",), rms_norm=(True,))
    d = size(config, "hidden_size", "HF Mamba2")
    expand = config.get("expand", 2)
    heads, head_dim = size(config, "num_heads", "HF Mamba2"), config.get("head_dim", 64)
    if heads * head_dim != expand * d:
        raise CheckpointError(
            f"HF Mamba2 config.json: num_heads * head_dim = {heads} * {head_dim} must equal expand * hidden_size "
            f"= {expand} * {d}"
        )
    eps = config.get("layer_norm_epsilon", 1e-5)
    mixer = {
        "kind": "ssd",
        "d_state": config.get("state_size", 128),
        "d_conv": config.get("conv_kernel", 4),
        "expand": expand,
        "head_dim": head_dim,
        "n_groups": config.get("n_groups", 1),
        "dt_min": config.get("time_step_min", 0.001),
        "dt_max": config.get("time_step_max", 0.1),
        "dt_init_floor": config.get("time_step_floor", 1e-4),
        "dt_limit": dt_limit(config),
        "norm_eps": eps,
        "conv_bias": config.get("use_conv_bias", True),
        "bias": config.get("use_bias", False),
    }
    n = layer_count(config, "num_hidden_layers", "HF Mamba2")
    return Recipe(
        name=config.get("_name_or_path") or "mamba2",
        vocab_size=require(config, "vocab_size", "HF Mamba2"),
        d_model=d,
        n_layers=n,
        tie_embeddings=config.get("tie_word_embeddings", False),
        residual_in_fp32=config.get("residual_in_fp32", True),
        norm={"eps": eps},
        mixers={"m": mixer},
        pattern=["m"] * n,
    )


def to_config(recipe: Recipe) -> dict:
    specs = used_specs(recipe, "ssd")
    if mixer_kinds(recipe) != {"ssd"} or len(specs) != 1 or recipe.mlp is not None:
        raise CheckpointError("HF Mamba2 holds one kind of SSD block, no MLP; save as format='ssmblocks'")
    (spec,) = specs
    if spec.D_has_hdim or spec.norm_before_gate or spec.norm_eps != recipe.norm.eps:
        raise CheckpointError(
            "HF Mamba2 has D per head, the gate before the norm and one eps for every norm; "
            "this recipe differs, save as format='ssmblocks'"
        )
    return {
        "model_type": "mamba2",
        "architectures": ["Mamba2ForCausalLM"],
        "vocab_size": recipe.padded_vocab_size,
        "hidden_size": recipe.d_model,
        "num_hidden_layers": recipe.n_layers,
        "num_heads": spec.expand * recipe.d_model // spec.head_dim,
        "head_dim": spec.head_dim,
        "state_size": spec.d_state,
        "n_groups": spec.n_groups,
        "expand": spec.expand,
        "conv_kernel": spec.d_conv,
        "chunk_size": spec.chunk_size or 256,  # transformers' default; a kernel setting, not read back
        "time_step_min": spec.dt_min,
        "time_step_max": spec.dt_max,
        "time_step_floor": spec.dt_init_floor,
        **limit_entry(spec.dt_limit),
        "use_bias": spec.bias,
        "use_conv_bias": spec.conv_bias,
        "rms_norm": True,
        "layer_norm_epsilon": recipe.norm.eps,
        "residual_in_fp32": recipe.residual_in_fp32,
        "tie_word_embeddings": recipe.tie_embeddings,
        "hidden_act": "silu",
    }


FAMILY = Family(
    name="HF Mamba2",
    keys=KEYS,
    matches=lambda config, shapes: config.get("model_type") == "mamba2",
    to_recipe=to_recipe,
    to_config=to_config,
)
