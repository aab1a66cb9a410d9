"""Generation for any CausalLM: greedy or sampled, batched with left padding, streamed, chunked prefill; the
decode step is a decode plan (ssmblocks.backends.plans: a CUDA graph on GPU, one-call C++ steps on the CPU)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .backends.plans import decode_plan
from .errors import ShapeError
from .state import ModelState


def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row from logits (b, vocab): argmax, or a sample after temperature, top-k
    and top-p (nucleus) filtering. Returns (b,) int64."""
    if not do_sample:
        return logits.argmax(-1)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature >= 0:
        raise ValueError(f"sampling: temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"sampling: top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ValueError(f"sampling: top_p must be in (0, 1] (1 = off), got {top_p!r}")
    logits = logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -torch.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()  # not inference_mode: its tensors could not be updated in training later (FSDP2's buffers)
def stream(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    stop_token_ids: list[int] | tuple[int, ...] = (),
    pad_token_id: int | None = None,
    prefill_chunk_size: int | None = None,
    cuda_graph: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (b,) int64, one step at a time.

    input_ids: (b, l) prompts, left-padded where attention_mask (b, l) has zeros. Rows that produced
    eos_token_id or one of stop_token_ids are finished: they yield pad_token_id (default: eos, else 0)
    from then on, and the stream ends when every row is finished or after max_new_tokens steps.
    prefill_chunk_size feeds the prompt in pieces of that many tokens. cuda_graph (default: on CUDA)
    replays the decode step from a captured CUDA graph.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"generate: input_ids must be a torch.Tensor (batch, seqlen), got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ShapeError(
            f"generate: input_ids must be (batch, seqlen) with batch, seqlen >= 1, got {tuple(input_ids.shape)}"
        )
    for name, value in (("max_new_tokens", max_new_tokens), ("prefill_chunk_size", prefill_chunk_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"generate: {name} must be an int, got {type(value).__name__} {value!r}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    b, l = input_ids.shape
    device = input_ids.device
    stops = torch.tensor([t for t in (eos_token_id, *stop_token_ids) if t is not None], dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    pick = lambda logits: sample_next(  # noqa: E731
        logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
    )

    state = model.init_state(b, l + max_new_tokens)
    logits = prefill(model, input_ids, state, attention_mask, prefill_chunk_size)
    step = decode_plan(model, state, cuda_graph)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = feed = pick(logits)
        if len(stops):  # without stop tokens no row finishes, and no step waits for the GPU to say so
            token = token.masked_fill(finished, pad)
            feed = token.masked_fill(finished, 0)  # rows already finished feed any valid id; their output is unused
            finished |= torch.isin(token, stops)
        yield token
        if i + 1 == max_new_tokens or (len(stops) and bool(finished.all())):
            return
        logits = step(feed)


def prefill(
    model, input_ids: torch.Tensor, state: ModelState, attention_mask=None, chunk_size: int | None = None
) -> torch.Tensor:
    """Feed the prompt through the state, in pieces of chunk_size tokens if given; return the logits
    of the last position, (b, vocab)."""
    l = input_ids.shape[1]
    chunk = l if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"generate: prefill_chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, l, chunk):
        mask = None if attention_mask is None else attention_mask[:, start : start + chunk]
        logits = model(input_ids[:, start : start + chunk], state=state, attention_mask=mask).logits
    return logits[:, -1]


def generate(
    model,
    input_ids: torch.Tensor,
    *,
    streamer: Callable[[torch.Tensor], None] | None = None,
    **kwargs,
) -> torch.Tensor:
    """Generate up to max_new_tokens after each prompt; returns (b, l + n_new) = prompts then new tokens.

    streamer(tokens (b,)) is called with each step's tokens as they come. Other keyword arguments are
    those of ``stream`` (sampling, eos/stop tokens, padding mask, chunked prefill, CUDA graph).
    """
    new = []
    for token in stream(model, input_ids, **kwargs):
        if streamer is not None:
            streamer(token)
        new.append(token)
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
