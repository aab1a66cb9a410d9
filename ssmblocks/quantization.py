"""Weight-only quantisation of a model's linear layers with torchao (optional dependency): int8 anywhere,
int4 on CUDA (torchao's tinygemm kernel; torchao 0.18 has no CPU int4 weight-only kernel)."""

from __future__ import annotations

import torch
from torch import nn

# Kept in high precision: the SSM dynamics and everything that is not a plain projection. conv1d, A_log, D,
# dt_bias and the norms are not nn.Linear, so quantize_ never touches them; dt_proj (Mamba1's dt, fed
# through softplus and exp) and the LM head when it shares its weight with the embedding are skipped too.
KEEP_HIGH_PRECISION = ("dt_proj",)


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = KEEP_HIGH_PRECISION) -> nn.Module:
    """Quantise the weights of every nn.Linear to int8 in place (activations stay in the model's dtype),
    except layers whose name has a part in ``skip`` and a tied LM head. Returns the model."""
    from torchao.quantization import Int8WeightOnlyConfig

    return _quantize(model, Int8WeightOnlyConfig(), skip)


def quantize_int4(model: nn.Module, group_size: int = 128, skip: tuple[str, ...] = KEEP_HIGH_PRECISION) -> nn.Module:
    """Quantise the weights of every nn.Linear to int4 with one scale and zero point per ``group_size``
    input channels (32, 64, 128 or 256), in place, for a bfloat16 model on CUDA. Skipped as in
    ``quantize_int8``, and layers whose in_features is not a multiple of group_size. Returns the model."""
    from torchao.quantization import Int4WeightOnlyConfig

    if group_size not in (32, 64, 128, 256):
        raise ValueError(f"quantize_int4: group_size must be 32, 64, 128 or 256, got {group_size}")
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    wrong = {(w.device.type, w.dtype) for w in weights} - {("cuda", torch.bfloat16)}
    if wrong:
        raise ValueError(
            f"quantize_int4: needs a bfloat16 model on CUDA (torchao's int4 kernel), found linear weights on "
            f"{', '.join(sorted(f'{d} in {t}' for d, t in wrong))}; on CPU use quantize_int8"
        )
    config = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    return _quantize(model, config, skip, lambda linear: linear.in_features % group_size == 0)


def _quantize(model: nn.Module, config, skip: tuple[str, ...], fits=lambda linear: True) -> nn.Module:
    try:
        from torchao.quantization import quantize_
    except ImportError as e:
        raise ImportError("quantisation needs torchao: pip install 'ssmblocks[quant]'") from e
    recipe = getattr(model, "recipe", None)
    tied = ("lm_head",) if recipe is not None and recipe.tie_embeddings else ()

    def selected(module: nn.Module, name: str) -> bool:
        skipped = any(part in skip + tied for part in name.split("."))
        return isinstance(module, nn.Linear) and not skipped and fits(module)

    quantize_(model, config, filter_fn=selected)
    return model
