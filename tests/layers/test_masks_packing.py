"""Packed sequences (cu_seqlens) and left-padded batches (attention_mask) behave, for every mixer, exactly as
running each sequence or row alone."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close
from tests.layers.test_state_protocol import D_MODEL, MIXERS

FP32 = 1e-5  # fp32 paths that differ only in batching, padding and summation order


def packed_lengths(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def left_pad_mask(pads: list[int], seqlen: int) -> torch.Tensor:
    """(b, seqlen) long mask with pads[i] leading zeros in row i."""
    return (torch.arange(seqlen)[None, :] >= torch.tensor(pads)[:, None]).long()


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize(
    "lengths", [[5, 1, 9, 3], [1, 1, 1], [17]], ids=["mixed_with_length_1", "all_length_1", "single_sequence"]
)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_packed_forward_and_grad_match_separate_runs(name, lengths, index_dtype):
    layer = MIXERS[name]()
    cu = packed_lengths(lengths).to(index_dtype)
    x = torch.randn(1, sum(lengths), D_MODEL)
    weight = torch.randn(1, sum(lengths), D_MODEL)  # a loss that weighs every output differently

    packed_x = x.clone().requires_grad_()
    packed = layer(packed_x, cu_seqlens=cu)
    (packed * weight).sum().backward()
    packed_param_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()

    separate_x = x.clone().requires_grad_()
    bounds = cu.tolist()
    separate = torch.cat([layer(separate_x[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], dim=1)
    (separate * weight).sum().backward()

    assert_close(packed, separate, FP32, "packed output")
    assert_close(packed_x.grad, separate_x.grad, FP32, "grad wrt the packed input")
    scale = max(p.grad.abs().max() for p in layer.parameters())
    for n, p in layer.named_parameters():
        if p.grad.abs().max() <= FP32 * scale:  # zero in exact arithmetic (A_log when every sequence has 1 token)
            assert packed_param_grads[n].abs().max() <= FP32 * scale, f"grad wrt {n} should be ~0"
        else:
            assert_close(packed_param_grads[n], p.grad, FP32, f"grad wrt {n}")


# ---------------------------------------------------------------------------------------------- left padding


PADS = {
    "pads_0_4_11": [0, 4, 11],  # no padding, some, and a row with a single real token
    "pads_3_0": [3, 0],
}


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("pads", PADS.values(), ids=PADS.keys())
def test_left_padded_batch_matches_rows_alone(backend, name, pads):
    layer = MIXERS[name]()
    l = 12
    x = torch.randn(len(pads), l, D_MODEL)  # padded positions hold garbage, not zeros: they must not matter
    with torch.no_grad():
        out = layer(x, attention_mask=left_pad_mask(pads, l))
        for i, pad in enumerate(pads):
            alone = layer(x[i : i + 1, pad:])
            assert_close(out[i : i + 1, pad:], alone, FP32, f"row {i} (pad {pad})")
    assert torch.isfinite(out).all(), "padded positions must not produce NaN or inf either"


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("decode_mask", ["ones", "none"])
def test_left_padded_prefill_then_decode_matches_rows_alone(backend, name, decode_mask):
    """The generation use case: prefill a left-padded batch through a state, then decode token by token."""
    layer = MIXERS[name]()
    pads, l, steps = [0, 4, 11], 12, 5
    b = len(pads)
    prompt = torch.randn(b, l, D_MODEL)
    tokens = torch.randn(b, steps, D_MODEL)
    with torch.no_grad():
        state = layer.init_state(b, l + steps)
        prefill = layer(prompt, state=state, attention_mask=left_pad_mask(pads, l))
        decode = [
            layer(tokens[:, t : t + 1], state=state, attention_mask=torch.ones(b, 1) if decode_mask == "ones" else None)
            for t in range(steps)
        ]
        decode = torch.cat(decode, dim=1)
        for i, pad in enumerate(pads):
            alone_state = layer.init_state(1, l + steps)
            alone_prefill = layer(prompt[i : i + 1, pad:], state=alone_state)
            alone_decode = torch.cat([layer(tokens[i : i + 1, t : t + 1], state=alone_state) for t in range(steps)], 1)
            assert_close(prefill[i : i + 1, pad:], alone_prefill, FP32, f"prefill row {i} (pad {pad})")
            assert_close(decode[i : i + 1], alone_decode, FP32, f"decode row {i} (pad {pad})")


@pytest.mark.parametrize("name", MIXERS)
def test_chunked_prefill_with_a_chunk_entirely_padding(name):
    """Row 0's first two prefill chunks are all padding; row 1 has none. Then decode."""
    layer = MIXERS[name]()
    pads, l, steps = [9, 0], 14, 3
    b = len(pads)
    prompt = torch.randn(b, l, D_MODEL)
    tokens = torch.randn(b, steps, D_MODEL)
    mask = left_pad_mask(pads, l)
    with torch.no_grad():
        state = layer.init_state(b, l + steps)
        prefill = torch.cat(
            [layer(prompt[:, a:z], state=state, attention_mask=mask[:, a:z]) for a, z in [(0, 5), (5, 9), (9, 14)]], 1
        )
        decode = torch.cat([layer(tokens[:, t : t + 1], state=state) for t in range(steps)], 1)
        for i, pad in enumerate(pads):
            alone_state = layer.init_state(1, l + steps)
            alone_prefill = layer(prompt[i : i + 1, pad:], state=alone_state)
            alone_decode = torch.cat([layer(tokens[i : i + 1, t : t + 1], state=alone_state) for t in range(steps)], 1)
            assert_close(prefill[i : i + 1, pad:], alone_prefill, FP32, f"prefill row {i} (pad {pad})")
            assert_close(decode[i : i + 1], alone_decode, FP32, f"decode row {i} (pad {pad})")
    assert torch.isfinite(prefill).all()


@pytest.mark.parametrize("name", list(MIXERS))
def test_left_padded_continuation_of_a_state_matches_row_alone(name):
    """DESIGN: padded positions change no state. A second left-padded turn on top of a prefilled state
    (multi-turn batched chat) must give each row what it gets alone, with the padding dropped."""
    layer = MIXERS[name]()
    pads, l1, l2 = [0, 3], 6, 6
    b = len(pads)
    first = torch.randn(b, l1, D_MODEL)
    second = torch.randn(b, l2, D_MODEL)
    with torch.no_grad():
        state = layer.init_state(b, l1 + l2)
        layer(first, state=state)
        out = layer(second, state=state, attention_mask=left_pad_mask(pads, l2))
        for i, pad in enumerate(pads):
            alone_state = layer.init_state(1, l1 + l2)
            layer(first[i : i + 1], state=alone_state)
            alone = layer(second[i : i + 1, pad:], state=alone_state)
            assert_close(out[i : i + 1, pad:], alone, FP32, f"row {i} (pad {pad})")
