"""Shared test helpers: one relative-error measure instead of ad-hoc allclose thresholds."""

from __future__ import annotations

import math

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> None:
    """Fail with the measured relative error when it exceeds ``tol``."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def backward_one_output(outputs, ref_outputs, used: int, leaves: dict, ref_leaves: dict, tol: float) -> None:
    """Backpropagate a random gradient from ``outputs[used]`` alone (and from the reference's), then check each
    leaf's gradient; where the reference's leaf got none (the output does not depend on it), the leaf's is None
    or zero."""
    grad = torch.randn_like(ref_outputs[used])
    outputs[used].backward(grad.to(outputs[used]))
    ref_outputs[used].backward(grad)
    for name, leaf in leaves.items():
        if leaf is None:
            continue
        if ref_leaves[name].grad is None:
            assert leaf.grad is None or not leaf.grad.any(), name
        else:
            assert_close(leaf.grad, ref_leaves[name].grad, tol, f"d{name}")


def step_through(step, kw: dict[str, torch.Tensor], state: torch.Tensor) -> torch.Tensor:
    """Feed kw's sequence (x, dt, A, B, C, optional D and z) one token at a time through a step op
    (selective_scan_step or ssd_step) that updates ``state`` in place; returns y stacked over time."""
    z = kw.get("z")
    ys = [
        step(
            kw["x"][:, t],
            kw["dt"][:, t],
            kw["A"],
            kw["B"][:, t],
            kw["C"][:, t],
            state,
            D=kw.get("D"),
            z=None if z is None else z[:, t],
        )
        for t in range(kw["x"].shape[1])
    ]
    return torch.stack(ys, dim=1)


def randomise(module: torch.nn.Module) -> None:
    """Random weights on which every parameter of a mixer matters (transformers' init leaves some paths
    tiny); softplus of the dt bias in [0.01, 0.5], A in [1, 8]."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(1, 8)))
            elif name.endswith("dt_bias") or name == "dt_proj.bias":
                p.copy_(torch.log(torch.expm1(torch.empty_like(p).uniform_(0.01, 0.5))))
            elif p.dim() >= 2:  # linear (out, in) or depthwise conv (channels, 1, k)
                p.normal_(0, 1 / math.sqrt(p.shape[1] * p.shape[2] if p.dim() == 3 else p.shape[1]))
            else:
                p.normal_(1 if name.endswith("norm.weight") else 0, 0.3)
