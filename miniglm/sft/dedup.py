"""Near-duplicate questions: compared normalised, by the Jaccard similarity of their character bigrams."""

from __future__ import annotations

import math
import unicodedata
from collections import defaultdict


def normalize_question(text: str) -> str:
    """Full-width to half-width (NFKC), lower case, no whitespace or punctuation: the form questions are compared in."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PSZC")


def bigrams(text: str) -> set[str]:
    return {text[i:i + 2] for i in range(len(text) - 1)} or ({text} if text else set())


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class Deduper:
    """Remembers questions; `add` refuses one whose bigram Jaccard similarity to any earlier one is >= threshold.

    Prefix filtering keeps it fast: with the bigrams in a fixed order, two sets that similar must share one of
    their first len - ceil(threshold * len) + 1 bigrams, so only those are indexed and probed.
    """

    def __init__(self, threshold: float = 0.9):
        self.threshold = threshold
        self.exact: set[str] = set()
        self.sets: list[set[str]] = []
        self.index: dict[str, list[int]] = defaultdict(list)

    def _prefix(self, grams: set[str]) -> list[str]:
        keep = len(grams) - math.ceil(self.threshold * len(grams) - 1e-9) + 1
        return sorted(grams)[:max(keep, 1)]

    def add(self, question: str) -> bool:
        norm = normalize_question(question)
        if not norm or norm in self.exact:
            return False
        grams = bigrams(norm)
        if self.threshold <= 1:
            candidates = {j for g in self._prefix(grams) for j in self.index.get(g, ())}
            if any(jaccard(grams, self.sets[j]) >= self.threshold for j in candidates):
                return False
        self.exact.add(norm)
        self.sets.append(grams)
        for g in self._prefix(grams):
            self.index[g].append(len(self.sets) - 1)
        return True

