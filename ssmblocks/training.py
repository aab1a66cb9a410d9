"""Helpers for users' own training loops."""

from __future__ import annotations

from torch import nn

# Parameters that weight decay must not shrink: the SSM dynamics (A_log, D, dt biases), norms and biases.
_NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: weight matrices and embeddings decay; A_log, D, dt_bias, every norm weight
    and every bias do not (as the Mamba papers train). Pass the result to e.g. ``torch.optim.AdamW``."""
    norms = tuple(m for m in model.modules() if "Norm" in type(m).__name__)
    norm_params = {id(p) for m in norms for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES or id(param) in norm_params
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_layers(model: nn.Module) -> dict[str, list[str]]:
    """Every nn.Linear of a model by kind (its attribute name: in_proj, x_proj, q_proj, gate_proj, ...),
    each with the full module names. For choosing LoRA targets that cover all layers of each kind."""
    kinds: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return kinds


def lora_targets(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """The kinds of linear layer to adapt, for ``peft.LoraConfig(target_modules=...)``: every kind the
    model has (mixer projections, attention, MLP), the LM head excluded by default. PEFT matches these
    names as module-name suffixes, so each covers that kind in every block."""
    return sorted(kind for kind in linear_layers(model) if kind not in exclude)
