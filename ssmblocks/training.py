"""Helpers for users' own training loops."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .layers._local import is_dtensor

# Parameters that weight decay must not shrink: the SSM dynamics (A_log, D, dt biases), norms and biases.
_NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: weight matrices and embeddings decay; A_log, D, dt_bias, every norm weight and
    every bias do not (as the Mamba papers train). Pass the result to e.g. ``torch.optim.AdamW``.

    Two groups, decay first; after tensor_parallel, whose split parameters are DTensors and the rest plain
    tensors, four, so no group mixes the two kinds (foreach optimizers cannot)."""
    norms = tuple(m for m in model.modules() if "Norm" in type(m).__name__)
    norm_params = {id(p) for m in norms for p in m.parameters(recurse=False)}
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES or id(param) in norm_params
        groups.setdefault((is_dtensor(param), exempt), []).append(param)
    return [
        {"params": ps, "weight_decay": 0.0 if exempt else weight_decay} for (_, exempt), ps in sorted(groups.items())
    ]


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


@torch.no_grad()
def clip_grad_norm_(parameters: nn.Module | Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale gradients so their total 2-norm is at most max_norm (> 0, finite); returns the norm before
    clipping. parameters: a module (its parameters), an iterable of tensors or one tensor.

    Like torch.nn.utils.clip_grad_norm_, but also for models whose parameters mix DTensors and plain
    tensors (ssmblocks.distributed.tensor_parallel splits the layers and replicates the rest): a DTensor's
    gradient counts with its whole tensor, a plain one once. Call it on every rank (it is collective there).
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or not 0 < max_norm < math.inf:
        raise ValueError(f"clip_grad_norm_: max_norm must be a positive finite number, got {max_norm!r}")
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    elif isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
    norms = [n.full_tensor() if is_dtensor(n) else n for n in norms]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if is_dtensor(g) else g).mul_(scale.to(g.dtype))
    return total
