"""The language-model head: the final hidden states' projection onto the vocabulary, and its token losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import Linear


class LMHead(Linear):
    """hidden (..., d) -> logits (..., padded_vocab_size), no bias (an ``nn.Linear``, key ``lm_head.weight``).

    Rows from ``vocab_size`` on pad the vocabulary (a checkpoint's ``pad_vocab_size_multiple``); they are no
    tokens: ``cross_entropy_sum`` leaves them out of the softmax, as the model slices them off its logits."""

    loss_from_logits = True  # the loss may be taken from forward's logits (False: no rank holds them whole)

    def __init__(self, d_model: int, padded_vocab_size: int, vocab_size: int, device=None, dtype=None):
        super().__init__(d_model, padded_vocab_size, bias=False, device=device, dtype=dtype)
        self.vocab_size = vocab_size

    def cross_entropy_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of float32 logits: hidden (t, d), targets (t,) token ids or -100 (ignored)."""
        logits = self(hidden)[:, : self.vocab_size].float()
        return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
