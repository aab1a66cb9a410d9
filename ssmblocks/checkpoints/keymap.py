"""Rename tables between our state-dict keys and a checkpoint's, usable in both directions."""

from __future__ import annotations

import re


class KeyMap:
    """Pairs of key templates ``(ours, theirs)``; ``{i}`` matches a layer index and ``{rest}`` any suffix.

    The first pair whose template matches a key wins, so specific pairs go before general ones.
    """

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs
        self._ours = [(_compile(o), t) for o, t in pairs]
        self._theirs = [(_compile(t), o) for o, t in pairs]

    def to_theirs(self, key: str) -> str | None:
        return _rename(key, self._ours)

    def to_ours(self, key: str) -> str | None:
        return _rename(key, self._theirs)


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(pattern + "$")


def _rename(key: str, table) -> str | None:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return target.format(**m.groupdict())
    return None
