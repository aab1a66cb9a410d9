"""Weight-only int8 quantisation of a model's linear layers with torchao (optional dependency)."""

from __future__ import annotations

from torch import nn

# Kept in high precision: the SSM dynamics and everything that is not a plain projection. conv1d, A_log, D,
# dt_bias and the norms are not nn.Linear, so quantize_ never touches them; dt_proj (Mamba1's dt, fed
# through softplus and exp) and the LM head when it shares its weight with the embedding are skipped too.
KEEP_HIGH_PRECISION = ("dt_proj",)


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = KEEP_HIGH_PRECISION) -> nn.Module:
    """Quantise the weights of every nn.Linear to int8 in place (activations stay in the model's dtype),
    except layers whose name has a part in ``skip`` and a tied LM head. Returns the model."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ImportError("quantize_int8 needs torchao: pip install 'ssmblocks[quant]'") from e
    recipe = getattr(model, "recipe", None)
    tied = ("lm_head",) if recipe is not None and recipe.tie_embeddings else ()

    def selected(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and not any(part in skip + tied for part in name.split("."))

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=selected)
    return model
