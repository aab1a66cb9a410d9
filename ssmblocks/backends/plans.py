"""Decode plans: a model's one-token step, bound once for the backend at hand and then run token after token.

    plan = decode_plan(model, state)      # after the prompt went through model(prompt, state=state)
    logits = plan(token)                  # token (b,) int -> logits (b, vocab); state advanced by one token

The kinds, chosen in this order:

- "cuda_graph": the model on CUDA (unless ``cuda_graph=False``): the forward captured once in a CUDA graph over
  the state's buffers and replayed each token.
- "cpp": on the CPU under the selection "auto" or "cpp", when at least one block binds a one-call C++ step
  (``cpp_steps.py``: SSM blocks, float32/float64, no autograd, modules as built): those blocks run as one call
  each, the others through their forward, and the final norm with the LM head as one call where it can.
- "forward": ``model(token[:, None], state=state)``.

A plan computes what the forward computes (rounding aside; tested plan == forward) on the state it was bound to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..state import ModelState
from . import cpp_steps, registry

if TYPE_CHECKING:
    from ..model import CausalLM


class DecodePlan:
    """A bound decode step: ``plan(token (b,)) -> logits (b, vocab)``, advancing the state it was made for,
    without autograd (a plan is for inference). ``kind`` says how it runs: "cuda_graph", "cpp" or "forward"."""

    def __init__(self, kind: str, step: Callable[[torch.Tensor], torch.Tensor]):
        self.kind, self._step = kind, step

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        return self._step(token)

    def __repr__(self) -> str:
        return f"DecodePlan(kind={self.kind!r})"


@torch.no_grad()
def decode_plan(model: CausalLM, state: ModelState, cuda_graph: bool | None = None) -> DecodePlan:
    """The decode plan of ``model`` over ``state`` (a ModelState of the batch the tokens will have).
    cuda_graph: None = on CUDA; True/False to force it on or off."""
    if not all(hasattr(model, name) for name in ("embed", "layers", "head")):
        raise TypeError(f"decode_plan: expected a CausalLM, got {type(model).__name__}")
    device = model.embedding.weight.device
    if device.type == "cuda" if cuda_graph is None else cuda_graph:
        return DecodePlan("cuda_graph", _graph_step(model, state))
    if registry.selected() in ("auto", "cpp") and (step := _cpp_step(model, state)) is not None:
        return DecodePlan("cpp", step)
    return DecodePlan("forward", lambda token: model(token[:, None], state=state).logits[:, -1])


def _cpp_step(model: CausalLM, state: ModelState) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Every block bound once: its one-call C++ step where it has one, its forward otherwise; None if no
    block has one."""
    device = model.embedding.weight.device
    residual = model.embed(torch.zeros(state.batch_size, 1, dtype=torch.long, device=device))
    bound = [cpp_steps.bind_block(block, residual, s) for block, s in zip(model.layers, state.layers, strict=True)]
    if all(call is None for call in bound):
        return None
    calls = [
        call or functools.partial(block, state=s)
        for call, block, s in zip(bound, model.layers, state.layers, strict=True)
    ]
    head = cpp_steps.bind_head(model, residual) or model.head

    def step(token: torch.Tensor) -> torch.Tensor:
        residual = model.embed(token[:, None])
        for call in calls:
            residual = call(residual)
        return head(residual)[:, -1]

    return step


def _graph_step(model: CausalLM, state: ModelState) -> Callable[[torch.Tensor], torch.Tensor]:
    """Capture one decode step in a CUDA graph over the state's buffers, which every replay updates in place."""
    device = model.embedding.weight.device
    static_token = torch.zeros(state.batch_size, 1, dtype=torch.long, device=device)
    warm = state.clone()  # warm-up runs (required before capture) must not advance the real state
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            model(static_token, state=warm)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = model(static_token, state=state).logits[:, -1]

    def step(token: torch.Tensor) -> torch.Tensor:
        static_token.copy_(token[:, None])
        graph.replay()
        return static_logits

    return step
