"""Synthetic recall tasks and the two reference scores a trained model must be read against.

Each task makes ``ids, targets`` (both (b, l) int64): ``targets[:, t]`` is the token the model must output
after reading ``ids[:, : t + 1]`` at the positions that are scored, and -100 everywhere else. A task's
answers come from its ``answers`` range of token ids.

- ``mqar``: multi-query associative recall (Zoology, Arora et al. 2023). ``pairs`` key-value pairs
  ``k1 v1 k2 v2 ...`` (distinct keys, values drawn with replacement, keys and values from disjoint ranges),
  then every key once more in a random order; at each of them the model must output its value.
- ``copying``: selective copying (Mamba, Gu & Dao 2023). ``data`` tokens scattered in order among noise
  tokens, then ``data`` marker tokens; at the i-th marker the model must output the i-th data token.

References: ``chance`` (a uniform guess over the answer range) and ``earlier_value_accuracy``, the expected
score of answering with a uniformly random one of the answer-range tokens read so far, a heuristic that
needs no recall at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MQAR:
    """Token ids: keys [0, keys), values [keys, keys + values). Sequence length 3 * pairs."""

    pairs: int = 12
    keys: int = 32
    values: int = 32

    @property
    def vocab_size(self) -> int:
        return self.keys + self.values

    @property
    def answers(self) -> range:
        return range(self.keys, self.keys + self.values)

    def __call__(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, targets (b, 3 * pairs)."""
        if self.pairs > self.keys:
            raise ValueError(f"MQAR pairs={self.pairs} needs at least as many keys, got keys={self.keys}")
        keys = torch.rand(batch, self.keys, generator=generator).argsort(1)[:, : self.pairs]
        values = torch.randint(self.keys, self.vocab_size, (batch, self.pairs), generator=generator)
        asked = torch.rand(batch, self.pairs, generator=generator).argsort(1)  # every key, in a random order
        context = torch.stack([keys, values], dim=2).flatten(1)  # k1 v1 k2 v2 ...
        ids = torch.cat([context, keys.gather(1, asked)], dim=1)
        targets = torch.full_like(ids, -100)
        targets[:, 2 * self.pairs :] = values.gather(1, asked)
        return ids, targets


@dataclass(frozen=True)
class Copying:
    """Token ids: noise 0, marker 1, data [2, 2 + values). Sequence length ``length + data``."""

    length: int = 48
    data: int = 8
    values: int = 16

    @property
    def vocab_size(self) -> int:
        return 2 + self.values

    @property
    def answers(self) -> range:
        return range(2, 2 + self.values)

    def __call__(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, targets (b, length + data)."""
        if self.data > self.length:
            raise ValueError(f"copying data={self.data} tokens do not fit in length={self.length}")
        tokens = torch.randint(2, self.vocab_size, (batch, self.data), generator=generator)
        where = torch.rand(batch, self.length, generator=generator).argsort(1)[:, : self.data].sort(1).values
        ids = torch.zeros(batch, self.length + self.data, dtype=torch.long)
        ids.scatter_(1, where, tokens)
        ids[:, self.length :] = 1
        targets = torch.full_like(ids, -100)
        targets[:, self.length :] = tokens
        return ids, targets


TASKS = {"mqar": MQAR, "copying": Copying}


def chance(answers: range) -> float:
    """Accuracy of a uniform guess over the answer range."""
    return 1 / len(answers)


def earlier_value_accuracy(ids: torch.Tensor, targets: torch.Tensor, answers: range) -> float:
    """Expected accuracy, over the scored positions of ids, targets (b, l), of answering with a uniformly
    random one of the distinct answer-range tokens among ``ids[:, : t + 1]`` (0 where there is none)."""
    in_range = ids[..., None] == torch.arange(answers.start, answers.stop)  # (b, l, answers)
    seen = in_range.cumsum(1) > 0  # (b, l, answers): read by position t
    scored = targets != -100
    seen, answer = seen[scored], targets[scored] - answers.start  # (scored, answers), (scored,)
    hit = seen.gather(1, answer[:, None])[:, 0].float()
    return (hit / seen.sum(1).clamp(min=1)).mean().item()
