"""Seed statistics in pure functions: the interval of a mean and the paired comparison of two settings.

* `mean_interval`: the 95 % confidence interval of a mean over seeds, either Student's t
  (`mean ± t_{0.975, n−1} · s / √n`, s the sample standard deviation) or a percentile bootstrap
  (10,000 resamples of the seeds with replacement, seeded, so a report is reproducible).
* `paired_difference`: two settings run on the same seeds (and everything else equal) compared seed
  by seed: the mean of the differences, its t interval and the two-sided p-value of the paired
  t-test (`scipy.stats.ttest_rel`, i.e. a one-sample t-test of the differences against 0).

With one seed there is no interval (None); a difference whose interval contains 0 (p ≥ α) is
"not significant".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000
CI_METHODS = ("t", "bootstrap")


def _t_quantile(n: int, level: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1))


def mean_interval(values: Sequence[float], method: str = "t", level: float = LEVEL,
                  seed: int = 0) -> tuple[float, float] | None:
    """The `level` confidence interval of the mean of `values` (None for fewer than two values)."""
    if method not in CI_METHODS:
        raise ValueError(f"--ci {method!r}: choose one of {', '.join(CI_METHODS)}")
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = x.size
    if n < 2:
        return None
    mean = float(x.mean())
    if method == "t":
        half = _t_quantile(n, level) * float(x.std(ddof=1)) / math.sqrt(n)
        return mean - half, mean + half
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 0.5 + level / 2])
    return float(lo), float(hi)


def overlap(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    """Whether two intervals share a point (False when either is missing)."""
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


@dataclass
class Paired:
    """A paired comparison over common seeds: mean of (setting − reference), its interval, the paired
    t-test's two-sided p-value; `significant` when p < 1 − level."""

    n: int
    mean: float
    interval: tuple[float, float] | None
    p_value: float | None
    level: float = LEVEL

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < 1 - self.level

    def to_dict(self) -> dict:
        return {"n_seeds": self.n, "mean": self.mean, "ci_low": None if self.interval is None else self.interval[0],
                "ci_high": None if self.interval is None else self.interval[1], "p_value": self.p_value,
                "significant": self.significant, "test": "paired t-test (two-sided)"}


def paired_difference(setting: dict[int, float], reference: dict[int, float], level: float = LEVEL) -> Paired | None:
    """Compare two settings seed by seed over the seeds both have (None when they share none)."""
    seeds = sorted(set(setting) & set(reference))
    if not seeds:
        return None
    d = np.asarray([setting[s] - reference[s] for s in seeds], dtype=np.float64)
    mean = float(d.mean())
    if d.size < 2:
        return Paired(1, mean, None, None, level)
    sd = float(d.std(ddof=1))
    if sd == 0.0:  # every seed moved by the same amount: the t statistic is infinite (or undefined at 0)
        return Paired(d.size, mean, (mean, mean), 1.0 if mean == 0 else 0.0, level)
    from scipy.stats import ttest_rel

    p = float(ttest_rel([setting[s] for s in seeds], [reference[s] for s in seeds]).pvalue)
    half = _t_quantile(d.size, level) * sd / math.sqrt(d.size)
    return Paired(d.size, mean, (mean - half, mean + half), p, level)
