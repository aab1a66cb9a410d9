"""Sequence segments: run a sequential kernel on pieces of each sequence at once where a batch is too narrow.

A kernel that walks a sequence in order (a state forward, its gradient backward) keeps one program per
sequence and tile; a narrow batch leaves the GPU mostly idle. Split each sequence into S segments: a
carry-only launch writes every segment's carry from a zero carry in (``local``) and its total log decay
(``seg_sum``, or what ``decay`` turns into one); the carries are chained here with a few torch ops; then
the full launch runs every segment at once from its true carry.
"""

import torch
import triton

from ._device import sm_count

MAX_SEGMENTS = 16


def count_segments(programs, n_chunks, device, per_sm, carry_cost):
    """How many segments to split each sequence into, given the programs per segment: the count that minimises
    waves x chunks per program (x 1 + carry_cost when split, for the carry-only launch), the GPU running
    SMs x per_sm programs at once. One where the GPU is unknown (the interpreter)."""
    if device.type != "cuda":
        return 1
    slots = sm_count(device) * per_sm

    def cost(s):
        return triton.cdiv(programs * s, slots) * triton.cdiv(n_chunks, s) * (1 + carry_cost * (s > 1))

    return min(range(1, min(n_chunks, MAX_SEGMENTS) + 1), key=cost)


def launch_on_segments(launch, edge, decay, local_shape, sum_shape, forward, device):
    """``launch(carry)`` runs a kernel on every segment, each from its carry ((b, S, *state) or None: zeros).

    With S > 1 segments (local_shape = (b, S, *state)), ``launch(None, local, seg_sum)`` first writes each
    segment's carry from a zero carry in, local (b, S, *state) float32, and seg_sum (b, S, *sum_shape)
    float32; a segment passes a carry c on as decay(seg_sum[:, s]) * c + local[:, s], front to back
    (``forward``: states) or back to front (state gradients). edge: (b, 1, *state) or None, the carry into the
    first segment walked (an initial state, or dL/d final state)."""
    b, segments = local_shape[:2]
    if segments == 1:
        return launch(edge)
    local = torch.empty(local_shape, device=device, dtype=torch.float32)
    seg_sum = local.new_empty(b, segments, *sum_shape)
    launch(None, local, seg_sum)
    order = range(segments) if forward else range(segments - 1, -1, -1)
    carries = {order[0]: torch.zeros_like(local[:, 0]) if edge is None else edge[:, 0]}
    for prev, s in zip(order, order[1:], strict=False):
        carries[s] = decay(seg_sum[:, prev]) * carries[prev] + local[:, prev]
    return launch(torch.stack([carries[s] for s in range(segments)], 1))
