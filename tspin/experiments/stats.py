"""Paired tests on per-prompt exact-match outcomes (two policies scored on the same prompts), per seed and pooled
over seeds, their power before a run, and summaries over seeds. Dependency-free: exact binomial tails with
math.comb, the normal distribution with math.erfc."""

from __future__ import annotations

import math
from collections.abc import Sequence


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


def mean_sd(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (n-1; 0 for a single value) over seeds."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_sd: no values")
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": len(v), "values": v}


# ----------------------------------------------------------------------------- pooled over seeds
Pairs = Sequence[tuple[Sequence[bool], Sequence[bool]]]  # per stratum (seed): outcomes of A and of B, paired


def _normal_sf(z: float) -> float:
    """P(Z >= z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def cmh_paired(strata: Pairs) -> dict:
    """Cochran-Mantel-Haenszel test of B against A for matched pairs in several strata (seeds, each with its own
    test prompts).

    Taken as a 2x2 table (policy x outcome) per prompt, the CMH statistic over all prompts of all strata is
    ``(sum_k (b_k - c_k))^2 / sum_k (b_k + c_k)``, with b_k / c_k the prompts of stratum k that only B / only A
    gets right: McNemar's statistic on the pooled discordant pairs (concordant prompts carry no information).
    Reported with its chi-square (1 df) p-value and, used for the decisions, the exact conditional test: given
    the m discordant prompts, B's count is Binomial(m, 1/2) under "no difference" (``p_b_better`` = P(X >= b),
    ``p_b_worse`` = P(X <= b)), valid for few discordant prompts too. ``diff``: the stratified accuracy
    difference acc(B) - acc(A) (prompts weighted equally)."""
    if not strata:
        raise ValueError("cmh_paired: expected at least one stratum")
    per = [mcnemar(a, b) for a, b in strata]
    b, c, n = (sum(x[k] for x in per) for k in ("b_only", "a_only", "n"))
    m = b + c
    chi2 = (b - c) ** 2 / m if m else 0.0
    better, worse = binom_tail(b, m), binom_tail(c, m)
    return {"strata": len(per), "n": n, "b_only": b, "a_only": c, "diff": (b - c) / n, "cmh_chi2": chi2,
            "p_cmh_chi2": math.erfc(math.sqrt(chi2 / 2)) if m else 1.0,  # P(chi2_1 >= x) = P(|Z| >= sqrt(x))
            "p_b_better": better, "p_b_worse": worse, "p_two_sided": min(1.0, 2 * min(better, worse))}


def paired_margin_test(strata: Pairs, margin: float) -> dict:
    """Non-inferiority, inferiority and equivalence of B against A within `margin` (an absolute accuracy
    difference), on matched pairs pooled over strata: a Wald z-test of the stratified difference
    ``diff = acc(B) - acc(A)``, whose variance is that of the mean per-prompt difference (in {-1, 0, 1}) within each
    stratum, added over strata with weights n_k / N.

    ``p_noninferior``: H0 diff <= -margin (small: B is at most `margin` worse than A).
    ``p_inferior``: H0 diff >= -margin (small: B is worse than A by more than `margin`).
    ``p_equivalent``: two one-sided tests, H0 |diff| >= margin (small: B and A differ by less than `margin`).
    ``ci90``: the 90% interval (the one the alpha = 0.05 one-sided tests use)."""
    if margin <= 0:
        raise ValueError(f"margin={margin!r}: expected > 0")
    if not strata:
        raise ValueError("paired_margin_test: expected at least one stratum")
    per = [mcnemar(a, b) for a, b in strata]
    total = sum(x["n"] for x in per)
    diff = sum(x["diff"] * x["n"] for x in per) / total
    # per stratum: Var(mean of d_i) = (E[d^2] - E[d]^2) / n, E[d^2] = discordant share
    var = sum((x["n"] / total) ** 2 * ((x["b_only"] + x["a_only"]) / x["n"] - x["diff"] ** 2) / x["n"] for x in per)
    se = math.sqrt(var)

    def p_value(distance: float) -> float:
        """One-sided p of an alternative `distance` = (diff - its H0 boundary, signed toward the alternative);
        with se = 0 (no spread: every prompt agrees) the difference is known exactly."""
        return _normal_sf(distance / se) if se > 0 else float(distance <= 0)

    p_ni, p_inf, p_upper = p_value(diff + margin), p_value(-margin - diff), p_value(margin - diff)
    z90 = 1.6448536269514722
    return {"strata": len(per), "n": total, "diff": diff, "se": se, "margin": margin, "p_noninferior": p_ni,
            "p_inferior": p_inf, "p_equivalent": max(p_ni, p_upper), "ci90": [diff - z90 * se, diff + z90 * se]}


# ----------------------------------------------------------------------------- power, before the run
def _binom_sf(k: int, m: int, q: float) -> float:
    """P(X >= k) for X ~ Binomial(m, q), summed in log space (m in the thousands)."""
    if k <= 0:
        return 1.0
    if q <= 0 or k > m:
        return 0.0
    if q >= 1:
        return 1.0
    lq, l1q, lm = math.log(q), math.log1p(-q), math.lgamma(m + 1)
    return min(1.0, sum(math.exp(lm - math.lgamma(i + 1) - math.lgamma(m - i + 1) + i * lq + (m - i) * l1q)
                        for i in range(k, m + 1)))


def mde_paired(n: int, discordant: float, *, alpha: float = 0.05, power: float = 0.8, tests: int = 1) -> float:
    """Minimum detectable effect of the exact one-sided McNemar / pooled CMH test (:func:`cmh_paired`) on `n`
    matched pairs of which a share `discordant` disagree: the smallest accuracy gain acc(B) - acc(A) it finds with
    probability `power` at level `alpha`. With ``tests`` > 1 every one of that many independent tests must
    succeed (a claim such as "every step improves"), so each needs power ``power ** (1 / tests)``. Exact binomial
    power, the number of discordant pairs taken at its expectation round(n * discordant)."""
    if n < 1 or not 0 <= discordant <= 1:
        raise ValueError(f"mde_paired: n={n}, discordant={discordant}: expected n >= 1 and a share in [0, 1]")
    m = round(n * discordant)
    k = next((k for k in range(m + 1) if binom_tail(k, m) < alpha), None)  # the smallest significant count
    if k is None:
        return float("inf")  # too few discordant pairs for any result to reach alpha
    target = power ** (1 / tests)
    lo, hi = 0.0, discordant  # the gain is at most the discordant share (then every discordant pair favours B)
    for _ in range(60):
        mid = (lo + hi) / 2
        if _binom_sf(k, m, 0.5 + mid / (2 * discordant)) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def mde_margin(n: int, discordant: float, margin: float, *, alpha: float = 0.05, power: float = 0.8,
               tests: int = 1) -> float:
    """For the non-inferiority test of :func:`paired_margin_test` on `n` pairs: the lowest true difference
    acc(B) - acc(A) at which B is still declared at most `margin` worse with probability `power` (each of `tests`
    such tests, as in :func:`mde_paired`). Normal approximation, the difference's spread taken at diff = 0."""
    z_a = _normal_quantile(1 - alpha)
    z_b = _normal_quantile(power ** (1 / tests))
    return -margin + (z_a + z_b) * math.sqrt(discordant / n)


def _normal_quantile(p: float) -> float:
    """The standard normal's p-quantile, by bisection on the survival function (to 1e-12)."""
    lo, hi = -12.0, 12.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 1 - _normal_sf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
