"""The two-sample Kolmogorov-Smirnov test, two-sided, as ``scipy.stats.ks_2samp`` computes it.

    >>> ks_2samp([1.0, 2.0], [3.0, 4.0])
    KSResult(statistic=1.0, pvalue=0.3333333333333333, method='exact')

TOFU's forget quality is this test's p-value between the truth ratios of the unlearned model and
of the retain (oracle) model on the forget set (open-unlearning ``ks_test``, which calls
``scipy.stats.ks_2samp`` with its defaults). scipy is not a kvwctl dependency, so it is written
here, plain Python:

* the statistic ``D = max |F1(x) - F2(x)|`` over the pooled sample values, the empirical CDFs
  counted with ``side='right'`` as scipy does (ties included);
* the p-value ``P(D' >= D)`` under the null hypothesis, exactly, when ``max(n1, n2) <= 10000``
  (scipy's ``method='auto'`` rule): D is rounded to ``h / lcm(n1, n2)`` as scipy rounds it, the
  lattice paths from (0, 0) to (n1, n2) that stay strictly inside the band ``|i/n1 - j/n2| < D``
  are counted with integers, and ``p = 1 - inside / C(n1 + n2, n1)`` is formed exactly before one
  rounding to float. The cost is at most ``n1 * n2`` integer additions (TOFU's forget10: 400 x 400);
* above that size, the Kolmogorov limiting distribution ``Q(sqrt(n1 n2 / (n1 + n2)) D)``; scipy uses
  ``kstwo`` there, so the two may differ in the last digits (``method`` says which was used).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

EXACT_LIMIT = 10000  # scipy's MAX_AUTO_N


@dataclass(frozen=True)
class KSResult:
    statistic: float
    pvalue: float
    method: str  # "exact" or "asymptotic"


def ks_statistic(first: Sequence[float], second: Sequence[float]) -> float:
    """``max |F1 - F2|`` over the pooled values (empirical CDFs with ``side='right'``)."""
    if not first or not second:
        raise ValueError("both samples must be non-empty")
    a, b = sorted(first), sorted(second)
    return max(
        abs(bisect.bisect_right(a, value) / len(a) - bisect.bisect_right(b, value) / len(b)) for value in (*a, *b)
    )


def ks_2samp(first: Sequence[float], second: Sequence[float]) -> KSResult:
    """Two-sided two-sample KS test: the statistic and its p-value (see the module docstring)."""
    if any(not math.isfinite(value) for value in (*first, *second)):
        raise ValueError("the samples must be finite numbers")
    statistic = ks_statistic(first, second)
    n1, n2 = len(first), len(second)
    if max(n1, n2) <= EXACT_LIMIT:
        return KSResult(statistic=statistic, pvalue=exact_pvalue(n1, n2, statistic), method="exact")
    effective = n1 * n2 / (n1 + n2)
    return KSResult(statistic=statistic, pvalue=kolmogorov_sf(math.sqrt(effective) * statistic), method="asymptotic")


def exact_pvalue(n1: int, n2: int, statistic: float) -> float:
    """``P(D >= statistic)`` for samples of sizes n1 and n2 under the null hypothesis, exactly."""
    lcm = n1 * n2 // math.gcd(n1, n2)
    h = round(statistic * lcm)  # D as a multiple of 1/lcm, as scipy rounds it
    if h == 0:
        return 1.0
    total = math.comb(n1 + n2, n1)
    return float(Fraction(total - paths_inside(n1, n2, h), total))


def paths_inside(n1: int, n2: int, h: int) -> int:
    """Lattice paths (0, 0) -> (n1, n2), steps +i or +j, every point with ``|i*n2 - j*n1| * lcm/(n1 n2) < h``.

    With ``lcm = lcm(n1, n2)``, the point (i, j) has ``|i/n1 - j/n2| * lcm = |i*(lcm/n1) - j*(lcm/n2)|``,
    an integer; a path stays inside the band when that is below ``h`` at every point.
    """
    lcm = n1 * n2 // math.gcd(n1, n2)
    step_i, step_j = lcm // n1, lcm // n2
    previous = [0] * (n2 + 1)  # paths to (i - 1, j), per j
    for i in range(n1 + 1):
        current = [0] * (n2 + 1)
        for j in range(n2 + 1):
            if abs(i * step_i - j * step_j) >= h:
                continue
            if i == 0 and j == 0:
                current[0] = 1
                continue
            current[j] = previous[j] + (current[j - 1] if j else 0)
        previous = current
    return previous[n2]


def kolmogorov_sf(x: float) -> float:
    """The Kolmogorov distribution's survival function ``Q(x) = 2 sum_k (-1)^(k-1) exp(-2 k^2 x^2)``."""
    if x <= 0:
        return 1.0
    if x < 1.0:  # the series converges slowly here: the equivalent theta-function form
        terms = sum(math.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8 * x * x)) for k in range(1, 20))
        return max(0.0, min(1.0, 1.0 - math.sqrt(2 * math.pi) / x * terms))
    series = sum((1.0 if k % 2 else -1.0) * math.exp(-2.0 * k * k * x * x) for k in range(1, 101))
    return max(0.0, min(1.0, 2.0 * series))
