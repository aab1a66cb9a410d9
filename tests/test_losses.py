"""The chunked next-token loss equals the loss from whole logits, in value and gradients, and never holds
the (tokens, vocab) logits."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssmblocks.losses import chunked_cross_entropy, next_token_targets
from tests.helpers import assert_close
from tests.test_model import VOCAB, hybrid


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest number of elements of any op's output with a vocabulary-sized dimension (forward
    and backward): logits, their gradients, the LM head's weight."""

    def __init__(self, vocab_sizes: tuple[int, ...]):
        super().__init__()
        self.vocab_sizes, self.numel = vocab_sizes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and any(size in self.vocab_sizes for size in t.shape):
                self.numel = max(self.numel, t.numel())
        return out


def loss_and_grads(model, ids, labels, **kw):
    model.zero_grad()
    out = model(ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie, chunk", [(True, 7), (False, 1), (False, 64)], ids=["tied-7", "untied-1", "untied-64"])
def test_chunked_loss_equals_whole_logits_loss(tie, chunk):
    torch.manual_seed(0)
    model = hybrid(tie=tie).train()
    ids = torch.randint(0, VOCAB, (2, 19))
    labels = ids.clone()
    labels[0, 5] = labels[1, :3] = -100
    expected, expected_grads = loss_and_grads(model, ids, labels)
    chunked = copy.deepcopy(model)
    chunked.loss_chunk_size = chunk
    out, grads = loss_and_grads(chunked, ids, labels)
    assert out.logits is None
    assert_close(out.loss, expected.loss, 1e-6, "loss")
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], 1e-5, name)
    if tie:
        assert chunked.lm_head.weight is chunked.embedding.weight


def test_chunked_loss_keeps_packed_boundaries():
    torch.manual_seed(0)
    model = hybrid()
    packed = torch.randint(0, VOCAB, (1, 23))
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)
    expected = model(packed, cu_seqlens=cu, labels=packed).loss
    model.loss_chunk_size = 5
    assert_close(model(packed, cu_seqlens=cu, labels=packed).loss, expected, 1e-6, "packed loss")


def test_whole_logits_never_exist():
    """With chunks of 4 tokens no op makes a vocabulary-wide tensor as large as the (tokens, vocab) logits, in
    forward or backward (the check catches them: without chunks they appear)."""
    torch.manual_seed(0)
    model = hybrid(tie=False).train()
    ids = torch.randint(0, VOCAB, (2, 30))
    whole_logits = ids.shape[0] * (ids.shape[1] - 1) * VOCAB
    for chunk, holds_logits in ((None, True), (4, False)):
        model.loss_chunk_size = chunk
        with LargestVocabTensor((VOCAB, model.recipe.padded_vocab_size)) as largest:
            model(ids, labels=ids).loss.backward()
        assert (largest.numel >= whole_logits) == holds_logits, (chunk, largest.numel, whole_logits)


def test_chunked_cross_entropy_refuses_bad_chunk_sizes():
    hidden, targets = torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="loss_chunk_size must be a positive number of tokens"):
            chunked_cross_entropy(hidden, targets, lambda h, y: h.sum(), bad)


def test_next_token_targets_leave_the_labels_unchanged():
    labels = torch.arange(10).view(1, 10)
    targets = next_token_targets(labels, (1, 10), torch.tensor([0, 4, 10], dtype=torch.int32))
    assert targets.tolist() == [[1, 2, 3, -100, 5, 6, 7, 8, 9]]  # position 3 ends the first sequence
    assert labels.tolist() == [list(range(10))]
