"""Paired tests on per-prompt exact-match outcomes (two policies scored on the same prompts), and summaries over
seeds. Exact, dependency-free: the binomial tail with math.comb, a seeded paired bootstrap with numpy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _check_paired(a: Sequence[bool], b: Sequence[bool]) -> None:
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired outcomes: expected two non-empty sequences of one length, got {len(a)} and {len(b)}")


def binom_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly."""
    if k <= 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact (binomial) McNemar test of policy B against policy A on the same prompts.

    Only discordant prompts carry information: ``b_only`` (B right, A wrong) and ``a_only``. Under the null of
    equal accuracy ``b_only ~ Binomial(b_only + a_only, 1/2)``. Returns both one-sided p-values (``p_b_better``:
    P(X >= b_only), ``p_b_worse``: P(X <= b_only)), the two-sided one (twice the smaller tail, at most 1) and
    the accuracy difference ``diff = acc(B) - acc(A)``.
    """
    _check_paired(a, b)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    m = b_only + a_only
    better, worse = binom_tail(b_only, m), binom_tail(a_only, m)
    return {"n": len(a), "b_only": b_only, "a_only": a_only, "diff": (b_only - a_only) / len(a),
            "p_b_better": better, "p_b_worse": worse, "p_two_sided": min(1.0, 2 * min(better, worse))}


def bootstrap_diff(a: Sequence[bool], b: Sequence[bool], *, margin: float, resamples: int = 10000,
                   seed: int = 0) -> dict:
    """Paired bootstrap of ``diff = acc(B) - acc(A)`` (prompts resampled with replacement, seeded).

    ``p_noninferior``: the bootstrap probability that diff <= -margin, the p-value of the one-sided test of
    H0 "B is worse than A by at least `margin`" (small: B is at most `margin` worse, i.e. B matches or beats A).
    ``p_inferior``: the probability that diff >= -margin, the p-value of H0 "B is not worse by more than `margin`"
    (small: B is worse than A by more than the margin). Also the 95% percentile interval of diff.
    """
    _check_paired(a, b)
    x = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    diffs = np.concatenate([x[rng.integers(0, len(x), (min(1000, resamples - i), len(x)))].mean(axis=1)
                            for i in range(0, resamples, 1000)])
    return {"diff": float(x.mean()), "margin": margin, "resamples": resamples, "seed": seed,
            "p_noninferior": float((np.sum(diffs <= -margin) + 1) / (resamples + 1)),
            "p_inferior": float((np.sum(diffs >= -margin) + 1) / (resamples + 1)),
            "ci95": [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))]}


def mean_sd(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (n-1; 0 for a single value) over seeds."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_sd: no values")
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": len(v), "values": v}
