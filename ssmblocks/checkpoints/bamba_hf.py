"""Hugging Face Bamba (``ibm-ai-platform/Bamba-9B*``, transformers' BambaForCausalLM)."""

from __future__ import annotations

from ..errors import CheckpointError
from ..recipe import AttentionSpec, Recipe
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
from .keymap import KeyMap

KEYS = KeyMap(
    [
        ("embedding.weight", "model.embed_tokens.weight"),
        ("norm_f.weight", "model.final_layernorm.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("layers.{i}.norm.weight", "model.layers.{i}.input_layernorm.weight"),
        ("layers.{i}.norm2.weight", "model.layers.{i}.pre_ff_layernorm.weight"),
        ("layers.{i}.mlp.{rest}", "model.layers.{i}.feed_forward.{rest}"),
        *[(f"layers.{{i}}.mixer.{p}_proj.{{rest}}", f"model.layers.{{i}}.self_attn.{p}_proj.{{rest}}") for p in "qkvo"],
        ("layers.{i}.mixer.{rest}", "model.layers.{i}.mamba.{rest}"),
    ]
)
ROTARY_FRACTION = 0.5  # transformers' BambaConfig fixes partial_rotary_factor at 0.5


def _rope(config: dict) -> tuple[float, float]:
    """(rope_theta, rotary fraction), from rope_parameters (transformers 5) or the top level (older)."""
    rope = config.get("rope_parameters") or {}
    refuse_unsupported(rope, "HF Bamba rope_parameters", rope_type=("default",))
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return theta, rope.get("partial_rotary_factor", config.get("partial_rotary_factor", ROTARY_FRACTION))


def to_recipe(config: dict, shapes) -> Recipe:
    refuse_unsupported(config, "HF Bamba", hidden_act=("silu",))
    d = size(config, "hidden_size", "HF Bamba")
    n = layer_count(config, "num_hidden_layers", "HF Bamba")
    expand = config.get("mamba_expand", 2)
    heads = size(config, "mamba_n_heads", "HF Bamba", default=128)
    head_dim = config.get("mamba_d_head", "auto")
    head_dim = expand * d // heads if head_dim == "auto" else head_dim
    if heads * head_dim != expand * d:
        raise CheckpointError(
            f"HF Bamba config.json: mamba_n_heads * mamba_d_head = {heads} * {head_dim} must equal "
            f"mamba_expand * hidden_size = {expand} * {d}"
        )
    eps = config.get("rms_norm_eps", 1e-5)
    ssd = {
        "kind": "ssd",
        "d_state": config.get("mamba_d_state", 256),
        "d_conv": config.get("mamba_d_conv", 4),
        "expand": expand,
        "head_dim": head_dim,
        "n_groups": config.get("mamba_n_groups", 1),
        "dt_limit": dt_limit(config),
        "norm_eps": eps,
        "conv_bias": config.get("mamba_conv_bias", True),
        "bias": config.get("mamba_proj_bias", False),
    }
    theta, rotary_fraction = _rope(config)
    attention = {
        "kind": "attention",
        "n_heads": require(config, "num_attention_heads", "HF Bamba"),
        "n_kv_heads": config.get("num_key_value_heads"),
        "rope_theta": theta,
        "rotary_fraction": rotary_fraction,
        "bias": config.get("attention_bias", False),
    }
    return Recipe(
        name=config.get("_name_or_path") or "bamba",
        vocab_size=require(config, "vocab_size", "HF Bamba"),
        d_model=d,
        n_layers=n,
        tie_embeddings=config.get("tie_word_embeddings", False),
        residual_in_fp32=False,  # Bamba keeps its residual stream in the model dtype
        norm={"eps": eps},
        mixers={"m": ssd, "a": attention},
        mlp={"hidden_dim": require(config, "intermediate_size", "HF Bamba"), "bias": config.get("mlp_bias", False)},
        pattern={"default": "m", "at": dict.fromkeys(config.get("attn_layer_indices") or [], "a")},
    )


def to_config(recipe: Recipe) -> dict:
    ssd, attn = used_specs(recipe, "ssd"), used_specs(recipe, "attention")
    if len(ssd) != 1 or len(attn) > 1 or mixer_kinds(recipe) - {"ssd", "attention"} or recipe.mlp is None:
        raise CheckpointError(
            "HF Bamba holds one kind of SSD block and one kind of attention block, each with a SwiGLU MLP; "
            "save as format='ssmblocks'"
        )
    m = ssd[0]
    a = attn[0] if attn else AttentionSpec(kind="attention", n_heads=1)
    if a.rotary_fraction != ROTARY_FRACTION or a.head_dim not in (None, recipe.d_model // a.n_heads):
        raise CheckpointError("HF Bamba attention has rotary_fraction 0.5 and head_dim = d_model / n_heads")
    if m.D_has_hdim or m.norm_before_gate or m.norm_eps != recipe.norm.eps:
        raise CheckpointError("HF Bamba has D per head, the gate before the norm and one eps for every norm")
    return {
        "model_type": "bamba",
        "architectures": ["BambaForCausalLM"],
        "vocab_size": recipe.padded_vocab_size,
        "hidden_size": recipe.d_model,
        "num_hidden_layers": recipe.n_layers,
        "attn_layer_indices": [i for i, name in enumerate(recipe.layers) if recipe.mixers[name].kind == "attention"],
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads or a.n_heads,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
        "attention_bias": a.bias,
        "intermediate_size": recipe.mlp.hidden_dim,
        "mlp_bias": recipe.mlp.bias,
        "mamba_n_heads": m.expand * recipe.d_model // m.head_dim,
        "mamba_d_head": m.head_dim,
        "mamba_n_groups": m.n_groups,
        "mamba_d_state": m.d_state,
        "mamba_d_conv": m.d_conv,
        "mamba_expand": m.expand,
        "mamba_chunk_size": m.chunk_size or 256,  # transformers' default; a kernel setting, not read back
        "mamba_conv_bias": m.conv_bias,
        "mamba_proj_bias": m.bias,
        **limit_entry(m.dt_limit),
        "rms_norm_eps": recipe.norm.eps,
        "tie_word_embeddings": recipe.tie_embeddings,
        "hidden_act": "silu",
    }


FAMILY = Family(
    name="HF Bamba",
    keys=KEYS,
    matches=lambda config, shapes: config.get("model_type") == "bamba",
    to_recipe=to_recipe,
    to_config=to_config,
)
