"""The original ``state-spaces/mamba-*`` and ``state-spaces/mamba2-*`` checkpoints (mamba_ssm's layout).

Their config.json (d_model, n_layer, ssm_cfg, ...) leaves much to defaults and at times disagrees with the
weights, so sizes the weights show (state size, head size, conv width, inner width) are read from the
tensor shapes, and a value config.json does state must agree with them.
"""

from __future__ import annotations

from ..errors import CheckpointError
from ..recipe import Recipe
from .family import Family, check_config, layer_count, mapping, require, shape_of, size
from .keymap import KeyMap

KEYS = KeyMap(
    [
        ("embedding.weight", "backbone.embedding.weight"),
        ("norm_f.weight", "backbone.norm_f.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("layers.{i}.{rest}", "backbone.layers.{i}.{rest}"),
    ]
)
MIXER = "backbone.layers.0.mixer."


def _layer_kind(config: dict, shapes) -> str:
    """Mamba1 or Mamba2, from ssm_cfg.layer and the tensor names (the weights decide when config is silent)."""
    in_weights = "Mamba2" if MIXER + "dt_bias" in shapes else "Mamba1" if MIXER + "x_proj.weight" in shapes else None
    stated = mapping(config, "ssm_cfg", "mamba_ssm").get("layer")
    if stated is not None and in_weights is not None and stated != in_weights:
        raise CheckpointError(
            f"config/weights disagreement: config.json says ssm_cfg.layer={stated!r}, but the tensors are "
            f"those of a {in_weights} layer"
        )
    kind = stated or in_weights
    if kind not in ("Mamba1", "Mamba2"):
        raise CheckpointError(f"mamba_ssm checkpoint: cannot tell the layer kind (ssm_cfg.layer={stated!r})")
    return kind


def _mamba1(ssm_cfg: dict, shapes, d: int) -> dict:
    e, n = shape_of(shapes, MIXER + "A_log", "mamba_ssm")
    r = shape_of(shapes, MIXER + "dt_proj.weight", "mamba_ssm")[1]
    k = shape_of(shapes, MIXER + "conv1d.weight", "mamba_ssm")[-1]
    check_config("ssm_cfg.d_state", ssm_cfg.get("d_state"), n, "A_log's shape")
    check_config("ssm_cfg.d_conv", ssm_cfg.get("d_conv"), k, "conv1d.weight's shape")
    check_config("ssm_cfg.expand", ssm_cfg.get("expand"), e // d, "A_log's shape")
    if ssm_cfg.get("dt_rank", "auto") != "auto":
        check_config("ssm_cfg.dt_rank", ssm_cfg["dt_rank"], r, "dt_proj.weight's shape")
    return {
        "kind": "selective_ssm",
        "d_state": n,
        "d_conv": k,
        "expand": e // d,
        "dt_rank": r,
        "conv_bias": MIXER + "conv1d.bias" in shapes,
        "bias": MIXER + "in_proj.bias" in shapes,
    }


def _mamba2(ssm_cfg: dict, shapes, d: int) -> dict:
    e = shape_of(shapes, MIXER + "out_proj.weight", "mamba_ssm")[1]
    (h,) = shape_of(shapes, MIXER + "A_log", "mamba_ssm")
    conv_rows, _, k = shape_of(shapes, MIXER + "conv1d.weight", "mamba_ssm")
    g = size(ssm_cfg, "ngroups", "mamba_ssm ssm_cfg", default=1)
    gn = (conv_rows - e) // 2
    if gn % g:
        raise CheckpointError(
            f"config/weights disagreement: ssm_cfg.ngroups={g} does not divide the {gn} rows of B in conv1d.weight"
        )
    check_config("ssm_cfg.d_state", ssm_cfg.get("d_state"), gn // g, "conv1d.weight's shape (with ngroups)")
    check_config("ssm_cfg.headdim", ssm_cfg.get("headdim"), e // h, "A_log's shape")
    check_config("ssm_cfg.d_conv", ssm_cfg.get("d_conv"), k, "conv1d.weight's shape")
    check_config("ssm_cfg.expand", ssm_cfg.get("expand"), e // d, "out_proj.weight's shape")
    spec = {
        "kind": "ssd",
        "d_state": gn // g,
        "d_conv": k,
        "expand": e // d,
        "head_dim": e // h,
        "n_groups": g,
        "D_has_hdim": shape_of(shapes, MIXER + "D", "mamba_ssm")[0] == e,
        "norm_before_gate": ssm_cfg.get("norm_before_gate", False),
        "conv_bias": MIXER + "conv1d.bias" in shapes,
        "bias": MIXER + "in_proj.bias" in shapes,
    }
    if "dt_limit" in ssm_cfg:  # chunk_size is mamba_ssm's kernel setting, not the model's: left to our kernels
        spec["dt_limit"] = tuple(ssm_cfg["dt_limit"])
    return spec


def to_recipe(config: dict, shapes) -> Recipe:
    if config.get("attn_layer_idx") or config.get("d_intermediate", 0):
        raise CheckpointError(
            "mamba_ssm checkpoint with attention layers or an MLP (attn_layer_idx / d_intermediate) is not "
            "supported yet; pure Mamba1 and Mamba2 checkpoints are"
        )
    if not config.get("rms_norm", True):
        raise CheckpointError("mamba_ssm config.json: rms_norm=false (a LayerNorm model) is not supported")
    d = size(config, "d_model", "mamba_ssm")
    n = layer_count(config, "n_layer", "mamba_ssm")
    ssm_cfg = mapping(config, "ssm_cfg", "mamba_ssm")
    mixer = _mamba2(ssm_cfg, shapes, d) if _layer_kind(config, shapes) == "Mamba2" else _mamba1(ssm_cfg, shapes, d)
    recipe = Recipe(
        name=config.get("_name_or_path") or "mamba_ssm",
        vocab_size=require(config, "vocab_size", "mamba_ssm"),
        pad_vocab_size_multiple=config.get("pad_vocab_size_multiple", 8),
        d_model=d,
        n_layers=n,
        tie_embeddings=config.get("tie_embeddings", True),
        residual_in_fp32=config.get("residual_in_fp32", True),
        mixers={"m": mixer},
        pattern=["m"] * n,
    )
    rows = shape_of(shapes, "backbone.embedding.weight", "mamba_ssm")[0]
    check_config("padded vocab_size", recipe.padded_vocab_size, rows, "backbone.embedding.weight's shape")
    return recipe


FAMILY = Family(
    name="mamba_ssm",
    keys=KEYS,
    matches=lambda config, shapes: "model_type" not in config and "d_model" in config and "n_layer" in config,
    to_recipe=to_recipe,
)
