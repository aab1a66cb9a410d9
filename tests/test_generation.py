"""generate / stream on a hybrid with every mixer kind."""

import pytest
import torch

from ssmblocks.generation import generate, sample_next, stream
from tests.test_model import VOCAB, hybrid


@pytest.fixture
def model():
    return hybrid()


def prompt(b=2, l=9):
    return torch.randint(0, VOCAB, (b, l))


@torch.no_grad()
def test_greedy_equals_argmax_of_full_forward(model):
    out = generate(model, prompt(), max_new_tokens=6)
    assert out.shape == (2, 15)
    again = model(out[:, :-1]).logits.argmax(-1)[:, 8:]
    assert torch.equal(again, out[:, 9:])


def test_method_and_function_agree(model):
    p = prompt()
    assert torch.equal(model.generate(p, max_new_tokens=4), generate(model, p, max_new_tokens=4))


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_chunked_prefill_generates_the_same(model, chunk):
    p = prompt(l=10)
    assert torch.equal(
        generate(model, p, max_new_tokens=5, prefill_chunk_size=chunk), generate(model, p, max_new_tokens=5)
    )


@pytest.mark.parametrize("chunk", [None, 3])
def test_left_padded_batch_generates_each_row_as_alone(model, chunk):
    lengths = [9, 4, 6]
    rows = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1] :] = row
        mask[i, width - row.shape[1] :] = 1
    batch = generate(model, ids, attention_mask=mask, max_new_tokens=7, prefill_chunk_size=chunk)
    for i, row in enumerate(rows):
        alone = generate(model, row, max_new_tokens=7)
        assert torch.equal(batch[i, width:], alone[0, row.shape[1] :]), f"row {i}"


def test_sampling_with_a_seed_reproduces_and_seeds_differ(model):
    p = prompt()
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20, top_p=0.95)
    a = generate(model, p, seed=1, **kw)
    assert torch.equal(a, generate(model, p, seed=1, **kw))
    assert not torch.equal(a, generate(model, p, seed=2, **kw))


def test_eos_and_stop_tokens_finish_rows_and_pad(model):
    p = prompt(b=2)
    free = generate(model, p, max_new_tokens=8)
    eos = int(free[0, 10])  # row 0's second new token
    out = generate(model, p, max_new_tokens=8, eos_token_id=eos, pad_token_id=-1)
    first = (out[0, 9:] == eos).nonzero()[0].item()
    assert (out[0, 9 + first + 1 :] == -1).all(), "a finished row yields padding"
    stop = generate(model, p, max_new_tokens=8, stop_token_ids=[int(free[0, 9]), int(free[1, 9])])
    assert stop.shape[1] == 10, "every row stopped after its first token"


def test_streaming_yields_tokens_as_they_come(model):
    p = prompt()
    seen = []
    out = generate(model, p, max_new_tokens=5, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out[:, 9:])
    it = stream(model, p, max_new_tokens=5)
    assert torch.equal(next(it), out[:, 9])


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, do_sample=True, top_k=2, generator=g)) for _ in range(50)}
    assert draws <= {1, 2} and len(draws) == 2
    draws = {int(sample_next(logits, do_sample=True, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {1}


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, prompt(), max_new_tokens=0)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seqlen\)"):
        generate(model, torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager():
    model = hybrid().cuda()
    p = prompt().cuda()
    eager = generate(model, p, max_new_tokens=16, cuda_graph=False)
    graphed = generate(model, p, max_new_tokens=16, cuda_graph=True)
    assert torch.equal(eager, graphed)
