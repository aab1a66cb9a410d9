"""The torch ops on packed sequences (cu_seqlens) against each sequence run alone, in float64: outputs, one
final state per sequence, and every gradient; the scans group sequences of similar length."""

import pytest
import torch

from ssmblocks.ops import packing
from ssmblocks.ops.conv import causal_conv1d_ref, causal_conv1d_torch
from ssmblocks.ops.selective_scan import selective_scan_torch
from ssmblocks.ops.ssd import ssd_scan_torch
from tests.helpers import assert_close

LENGTHS = [3, 1, 40, 7, 2, 12, 5]  # groups by length: [1, 2], [3, 5], [7, 12], [40]
PACKS = {"mixed": LENGTHS, "one-length": [6, 6, 6]}  # one length: the pack runs as a batch as it lies
TOL = 1e-10


def bounds(lengths=LENGTHS):
    return torch.tensor([0, *lengths]).cumsum(0).tolist()


def leaves(**shapes):
    return {k: torch.randn(*s, dtype=torch.float64).requires_grad_(True) for k, s in shapes.items()}


def compare(packed_fn, alone_fn, kw, lengths=LENGTHS):
    """packed_fn(kw) -> (y, final or None); alone_fn(kw, a, b, i) -> the same of sequence i = tokens a..b."""
    y, final = packed_fn(kw)
    dy, dfinal = torch.randn_like(y), None if final is None else torch.randn_like(final)
    outputs = [(y, dy)] + ([] if final is None else [(final, dfinal)])
    torch.autograd.backward(*zip(*outputs, strict=True))
    grads = {k: v.grad.clone() for k, v in kw.items()}
    for v in kw.values():
        v.grad = None
    b = bounds(lengths)
    alone = [alone_fn(kw, b[i], b[i + 1], i) for i in range(len(lengths))]
    y_ref = torch.cat([a[0] for a in alone], 1)
    assert_close(y, y_ref, TOL, "y")
    refs = [(y_ref, dy)]
    if final is not None:
        final_ref = torch.cat([a[1] for a in alone])
        assert_close(final, final_ref, TOL, "final_state")
        refs.append((final_ref, dfinal))
    torch.autograd.backward(*zip(*refs, strict=True))
    for k, v in kw.items():
        assert_close(grads[k], v.grad, TOL, f"d{k}")


@pytest.mark.parametrize("lengths", PACKS.values(), ids=PACKS.keys())
def test_ssd_scan_packed_matches_sequences_alone(lengths):
    t, h, p, g, n = sum(lengths), 4, 3, 2, 5
    kw = leaves(x=(1, t, h, p), dt=(1, t, h), A=(h,), B=(1, t, g, n), C=(1, t, g, n), D=(h,), z=(1, t, h, p),
                init=(len(lengths), h, p, n))  # fmt: skip
    cu = torch.tensor(bounds(lengths), dtype=torch.int32)

    def args(kw, a, b):
        dt = torch.nn.functional.softplus(kw["dt"][:, a:b])
        return kw["x"][:, a:b], dt, -kw["A"].exp(), kw["B"][:, a:b], kw["C"][:, a:b], kw["D"], kw["z"][:, a:b]

    compare(
        lambda kw: ssd_scan_torch(*args(kw, 0, t), initial_state=kw["init"], chunk_size=4, cu_seqlens=cu),
        lambda kw, a, b, i: ssd_scan_torch(*args(kw, a, b), initial_state=kw["init"][i : i + 1], chunk_size=4),
        kw,
        lengths,
    )


@pytest.mark.parametrize("lengths", PACKS.values(), ids=PACKS.keys())
@pytest.mark.parametrize("dt_softplus", [True, False])
def test_selective_scan_packed_matches_sequences_alone(dt_softplus, lengths):
    t, e, n = sum(lengths), 6, 4
    kw = leaves(x=(1, t, e), dt=(1, t, e), A=(e, n), B=(1, t, n), C=(1, t, n), D=(e,), z=(1, t, e),
                init=(len(lengths), e, n))  # fmt: skip
    cu = torch.tensor(bounds(lengths))  # int64 too

    def args(kw, a, b):
        dt = kw["dt"][:, a:b] if dt_softplus else torch.nn.functional.softplus(kw["dt"][:, a:b])
        return kw["x"][:, a:b], dt, -kw["A"].exp(), kw["B"][:, a:b], kw["C"][:, a:b], kw["D"], kw["z"][:, a:b]

    def packed(kw):
        return selective_scan_torch(*args(kw, 0, t), kw["init"], 4, dt_softplus=dt_softplus, cu_seqlens=cu)

    def alone(kw, a, b, i):
        return selective_scan_torch(*args(kw, a, b), kw["init"][i : i + 1], 4, dt_softplus=dt_softplus)

    compare(packed, alone, kw, lengths)


def test_causal_conv1d_packed_matches_sequences_alone():
    t, c = sum(LENGTHS), 5
    kw = leaves(x=(1, t, c), weight=(c, 1, 4), bias=(c,))
    cu = torch.tensor(bounds(), dtype=torch.int32)

    def packed(kw):
        return causal_conv1d_torch(kw["x"], kw["weight"], kw["bias"], "silu", cu_seqlens=cu), None

    def alone(kw, a, b, i):
        return causal_conv1d_ref(kw["x"][:, a:b], kw["weight"], kw["bias"], "silu"), None

    compare(packed, alone, kw)


def test_scans_run_once_per_group_of_similar_lengths():
    """Lengths within a factor of 2 of a group's shortest share its padded batch: 4 groups for LENGTHS, each
    padded to its longest."""
    calls = []

    def scan(x, initial_state):
        calls.append(tuple(x.shape))
        return x * 2, torch.zeros(x.shape[0], 1)

    x = torch.randn(1, sum(LENGTHS), 3)
    y, _ = packing.scan_by_length(scan, torch.tensor(bounds()), {"x": (x, 0.0)}, None)
    assert sorted(calls) == [(1, 40, 3), (2, 2, 3), (2, 5, 3), (2, 12, 3)]
    assert_close(y, x * 2, 0.0, "y")
