"""Handlers a session can register as ``"spear_nb.samples.handlers:NAME"``."""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[a-z']+")


def word_frequencies(text: str, top: int = 10) -> list[tuple[str, int]]:
    """The ``top`` most frequent words of ``text``, most frequent first."""
    words = (w.strip("'") for w in _WORD.findall(text.lower()))
    counts = Counter(w for w in words if w)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]


def line_count(text: str) -> int:
    """How many lines ``text`` has."""
    return len(text.splitlines())
