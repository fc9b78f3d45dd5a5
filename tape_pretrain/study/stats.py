"""Statistics for study tables: mean and sample sd over seeds, Student's t quantile (no scipy), paired differences
to a baseline with a t-interval, and the power-law fit L = E + A * N^-alpha."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_SIZES_FOR_FIT = 4
"""A three-parameter curve through fewer points than this is not a fit (three points fix it exactly)."""


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; nan for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom: the closed-form finite series
    (Abramowitz & Stegun 26.7.3 and 26.7.4), exact up to rounding."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: A = 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ...)), no sum for df = 1
        term, total = c, c if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c * c * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + s * total)
    else:  # even: A = sin (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ...)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c * c * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    return 0.5 + math.copysign(a / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, by bisection on t_cdf (e.g. t_quantile(0.975, 4) = 2.776)."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


@dataclass
class PairedDifference:
    n: int
    """Seeds used: present for both the encoding and the baseline, with a finite value in both."""
    mean: float
    """Mean over those seeds of (encoding - baseline) (nan when n = 0)."""
    low: float
    """Lower end of the 95% t-interval of the mean (nan with fewer than two seeds)."""
    high: float
    """Upper end of the interval."""
    non_finite: tuple[int, ...] = ()
    """Shared seeds left out because either value is nan or inf (a diverged run): never dropped silently."""


def paired_difference(values: dict[int, float], baseline: dict[int, float], level: float = 0.95
                      ) -> PairedDifference | None:
    """Per-seed differences values[seed] - baseline[seed] over the seeds both have with finite values; their mean
    and the two-sided t-interval with n - 1 degrees of freedom; the shared seeds left out in ``non_finite``. None
    when no seed is shared."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    non_finite = tuple(s for s in seeds if not math.isfinite(values[s] - baseline[s]))
    diffs = [values[s] - baseline[s] for s in seeds if s not in non_finite]
    mean, sd = mean_sd(diffs)
    if len(diffs) < 2:
        return PairedDifference(len(diffs), mean, math.nan, math.nan, non_finite)
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return PairedDifference(len(diffs), mean, mean - half, mean + half, non_finite)


@dataclass
class PowerLawFit:
    e: float
    """Irreducible loss E."""
    a: float
    """Scale A."""
    alpha: float
    """Exponent alpha."""
    rmse: float
    """Root mean squared residual of the fit."""

    def __call__(self, n):
        return self.e + self.a * np.asarray(n, dtype=float) ** -self.alpha


def _least_squares_given_alpha(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(E, A, sse) of y = E + A x with E >= 0 and A >= 0 (closed form: the unconstrained fit, else a boundary)."""
    candidates = []
    design = np.stack([np.ones_like(x), x], axis=1)
    (e, a), *_ = np.linalg.lstsq(design, y, rcond=None)
    if e >= 0 and a >= 0:
        candidates.append((e, a))
    candidates.append((0.0, max(float(x @ y / (x @ x)), 0.0)))  # E = 0
    candidates.append((max(float(y.mean()), 0.0), 0.0))  # A = 0
    return min(((e, a, float(((e + a * x - y) ** 2).sum())) for e, a in candidates), key=lambda c: c[2])


def fit_power_law(parameters: list[float], losses: list[float]) -> PowerLawFit:
    """L = E + A * N^-alpha by a grid over alpha (0.005 ... 3, refined around the best) with E and A by least
    squares for each alpha: no starting point to choose and no local minimum to fall into. Needs at least
    MIN_SIZES_FOR_FIT distinct N."""
    n = np.asarray(parameters, dtype=float)
    y = np.asarray(losses, dtype=float)
    if len(set(n.tolist())) < MIN_SIZES_FOR_FIT:
        raise ValueError(f"a power-law fit needs at least {MIN_SIZES_FOR_FIT} distinct sizes, got {len(set(n))}")
    scale = n.min()  # fit on N / N_min for conditioning; A = A' * N_min^alpha
    ratio = n / scale

    def solve(alpha: float) -> tuple[float, float, float]:
        return _least_squares_given_alpha(ratio**-alpha, y)

    grid = np.linspace(0.005, 3.0, 600)
    for _ in range(6):
        sse = [solve(alpha)[2] for alpha in grid]
        best = int(np.argmin(sse))
        step = grid[1] - grid[0]
        grid = np.linspace(max(grid[best] - step, 1e-6), grid[best] + step, 201)
    alpha = float(grid[int(np.argmin([solve(a)[2] for a in grid]))])
    e, a_scaled, sse = solve(alpha)
    return PowerLawFit(e=float(e), a=float(a_scaled * scale**alpha), alpha=alpha, rmse=math.sqrt(sse / len(y)))
