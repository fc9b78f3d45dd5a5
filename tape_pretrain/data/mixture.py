"""The deterministic weighted interleaving of a mixture's sources (data.sources).

Source s with weight w_s contributes its k-th window at time (k + 1/2) / w_s; the global window sequence is every
source's windows in order of time (ties to the lower source index): Sainte-Laguë apportionment, made sequential.
Among the first p windows, source s has close to p w_s / sum(w) of them at every p (two sources: within one window;
with many sources of very unequal weights a few windows at worst, never growing with p): the mixture holds its
weights over any stretch of training, not only on average. Position p's (source, ordinal) is a function of p and the
weights alone: not of the world size, and no state beyond the position is needed to resume.

Arithmetic is exact: weights become the integers q_s of their exact decimal fractions, and times are compared as
integers, so every rank and every resume computes the same order.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def integer_weights(weights: list[float]) -> list[int]:
    """The smallest integers in the ratio of the weights' decimal values (0.5, 0.3, 0.2 -> 5, 3, 2)."""
    fractions = [Fraction(repr(float(w))) for w in weights]
    common = math.lcm(*(f.denominator for f in fractions))
    scaled = [int(f * common) for f in fractions]
    divisor = math.gcd(*scaled)
    return [q // divisor for q in scaled]


def _count_before(q: int, numerator: int, denominator: int) -> int:
    """Windows of a source of integer weight q whose time (2k + 1) / (2q) is below numerator / denominator."""
    return max(0, -(-(2 * q * numerator - denominator) // (2 * denominator)))


class Interleaving:
    """Positions of the global window sequence -> (source index, ordinal within that source)."""

    def __init__(self, weights: list[float]):
        if not weights or any(not w > 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"mixture weights must be positive and finite, got {weights}")
        self.q = integer_weights(weights)
        self.total = sum(self.q)
        self._time_scale = [math.lcm(*self.q) // q for q in self.q]  # (2k+1) * scale_s = time x 2 lcm(q)

    def _candidates(self, first: int, count: int) -> tuple[list[int], list[tuple[int, int, int]]]:
        """(counts of each source's windows before the candidates, the candidates sorted by time), where the
        candidates cover positions first .. first + count - 1."""
        slack = len(self.q)  # the counts at a time T are within len(q) / 2 of T x total
        low, high = max(0, first - slack), first + count + slack  # times low / total and high / total
        before = [_count_before(q, low, self.total) for q in self.q]
        until = [_count_before(q, high, self.total) for q in self.q]
        candidates = sorted(((2 * k + 1) * scale, s, k) for s, scale in enumerate(self._time_scale)
                            for k in range(before[s], until[s]))
        return before, candidates

    def windows(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source [count], ordinal [count]) int64 of positions first .. first + count - 1."""
        before, candidates = self._candidates(first, count)
        skip = first - sum(before)
        chosen = candidates[skip:skip + count]
        return (np.fromiter((s for _, s, _ in chosen), dtype=np.int64, count=count),
                np.fromiter((k for _, _, k in chosen), dtype=np.int64, count=count))

    def counts(self, position: int) -> list[int]:
        """Windows of each source among the first ``position`` of the sequence."""
        before, candidates = self._candidates(position, 0)
        counts = list(before)
        for _, s, _ in candidates[:position - sum(before)]:
            counts[s] += 1
        return counts
