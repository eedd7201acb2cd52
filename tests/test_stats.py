"""Paired tests: the exact McNemar test against hand-computed binomial tails, the pooled Cochran-Mantel-Haenszel
test for matched pairs against the textbook CMH and a published example, the margin tests, the power (MDE)
computations, mean +- sd over seeds, and the claims' verdict rules on constructed outcomes."""

import math

import numpy as np
import pytest

from tspin.experiments.claims import MARGIN, main_claims, stability_claims
from tspin.experiments.collect import edit_distance, normalized_edit_distance
from tspin.experiments.stats import (
    binom_tail,
    cmh_paired,
    mcnemar,
    mde_margin,
    mde_paired,
    mean_sd,
    paired_margin_test,
)


def _pairs(both: int, a_only: int, b_only: int, neither: int):
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


def test_binom_tail_is_the_exact_binomial_tail():
    assert binom_tail(0, 7) == 1.0
    assert binom_tail(5, 5) == 1 / 32
    assert binom_tail(9, 10) == pytest.approx(11 / 1024)
    # symmetric: P(X >= k) = P(X <= n - k)
    assert binom_tail(7, 12) == pytest.approx(sum(math.comb(12, i) for i in range(0, 6)) / 4096)


def test_mcnemar_counts_discordant_prompts_only():
    a, b = _pairs(both=500, a_only=1, b_only=9, neither=490)
    r = mcnemar(a, b)
    assert (r["b_only"], r["a_only"], r["n"]) == (9, 1, 1000)
    assert r["diff"] == pytest.approx(0.008)
    assert r["p_b_better"] == pytest.approx(11 / 1024)  # P(X >= 9), X ~ Bin(10, 1/2)
    assert r["p_b_worse"] == pytest.approx(1 - 1 / 1024)  # P(X <= 9)
    assert r["p_two_sided"] == pytest.approx(22 / 1024)
    # concordant prompts change nothing; swapping the policies swaps the tails
    a2, b2 = _pairs(both=5, a_only=1, b_only=9, neither=3)
    assert mcnemar(a2, b2)["p_b_better"] == r["p_b_better"]
    assert mcnemar(b, a)["p_b_worse"] == r["p_b_better"]
    same = mcnemar(a, a)
    assert same["p_two_sided"] == 1.0 and same["p_b_better"] == 1.0
    with pytest.raises(ValueError, match="one length"):
        mcnemar(a, b[:-1])


def test_mean_sd():
    r = mean_sd([0.5, 0.6, 0.7])
    assert r["mean"] == pytest.approx(0.6) and r["sd"] == pytest.approx(0.1) and r["n"] == 3
    assert mean_sd([0.4])["sd"] == 0.0
    with pytest.raises(ValueError):
        mean_sd([])


def _cmh_textbook(tables):
    """The Cochran-Mantel-Haenszel statistic of K 2x2 tables [[a, b], [c, d]], as textbooks write it (no continuity
    correction): (sum_k a_k - E a_k)^2 / sum_k Var a_k under the hypergeometric null."""
    num = var = 0.0
    for (a, b), (c, d) in tables:
        n = a + b + c + d
        num += a - (a + b) * (a + c) / n
        var += (a + b) * (c + d) * (a + c) * (b + d) / (n * n * (n - 1))
    return num * num / var


def test_cmh_for_matched_pairs_is_the_textbook_cmh_with_a_stratum_per_prompt():
    # Agresti, Categorical Data Analysis: presidential approval, the same 1600 people asked twice (approve first and
    # second 794, first only 150, second only 86, neither 570): McNemar z^2 = (86 - 150)^2 / 236 = 17.36
    first, second = _pairs(both=794, a_only=150, b_only=86, neither=570)
    r = cmh_paired([(first, second)])
    assert (r["b_only"], r["a_only"]) == (86, 150) and r["cmh_chi2"] == pytest.approx(17.356, abs=1e-3)
    assert r["p_cmh_chi2"] == pytest.approx(3.1e-5, rel=0.05)  # P(chi2_1 >= 17.36)
    assert r["p_b_worse"] < 1e-4 and r["p_b_better"] > 0.99
    # three strata (seeds) of different sizes: the CMH statistic over all prompts, each a 2x2 table of
    # policy (A, B) x outcome (right, wrong), equals the pooled matched-pairs statistic
    strata = [_pairs(both=30, a_only=4, b_only=9, neither=20), _pairs(both=12, a_only=7, b_only=3, neither=9),
              _pairs(both=50, a_only=2, b_only=8, neither=1)]
    tables = [[[int(x), 1 - int(x)], [int(y), 1 - int(y)]] for a, b in strata for x, y in zip(a, b)]
    informative = [t for t in tables if t[0][0] != t[1][0]]  # concordant prompts: zero variance, no information
    r = cmh_paired(strata)
    assert r["cmh_chi2"] == pytest.approx(_cmh_textbook(informative)) == pytest.approx((20 - 13) ** 2 / 33)
    # the exact conditional test: B's 20 of 33 discordant prompts against Binomial(33, 1/2)
    assert r["p_b_better"] == pytest.approx(sum(math.comb(33, i) for i in range(20, 34)) / 2 ** 33)
    assert r["diff"] == pytest.approx(7 / sum(len(a) for a, _ in strata)) and r["strata"] == 3
    with pytest.raises(ValueError, match="at least one stratum"):
        cmh_paired([])


def test_margin_tests_on_pooled_pairs():
    # two strata of 1000 prompts: B loses 0.004 in each; 100 discordant prompts per stratum
    strata = [_pairs(both=500, a_only=52, b_only=48, neither=400)] * 2
    r = paired_margin_test(strata, margin=0.02)
    se = math.sqrt(2 * (0.25 * (0.1 - 0.004 ** 2) / 1000))  # the mean's variance per stratum, weights 1/2
    assert r["diff"] == pytest.approx(-0.004) and r["se"] == pytest.approx(se)
    z_ni = (-0.004 + 0.02) / se
    assert r["p_noninferior"] == pytest.approx(0.5 * math.erfc(z_ni / math.sqrt(2)))  # P(Z >= z)
    assert r["p_noninferior"] < 0.05 < r["p_inferior"]
    assert r["p_equivalent"] == pytest.approx(max(r["p_noninferior"], 0.5 * math.erfc((0.024 / se) / math.sqrt(2))))
    assert r["ci90"][0] == pytest.approx(-0.004 - 1.6448536 * se)
    # B far worse: more than the margin worse, neither non-inferior nor equivalent
    worse = paired_margin_test([_pairs(both=400, a_only=120, b_only=20, neither=460)], margin=0.02)
    assert worse["p_inferior"] < 1e-6 and worse["p_noninferior"] > 0.99 and worse["p_equivalent"] > 0.99
    # every prompt concordant: the difference is known exactly (0), within any margin
    same = paired_margin_test([_pairs(both=5, a_only=0, b_only=0, neither=5)], margin=0.02)
    assert (same["se"], same["p_noninferior"], same["p_inferior"], same["p_equivalent"]) == (0.0, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="margin"):
        paired_margin_test(strata, margin=0)


def test_minimum_detectable_effects():
    # the numbers: 1000 test prompts, 8% discordant, one-sided alpha 0.05, 80% power: about 0.022-0.025
    one = mde_paired(1000, 0.08)
    assert 0.02 < one < 0.026
    assert one == pytest.approx((1.6449 + 0.8416) * math.sqrt(0.08 / 1000), rel=0.08)  # the normal approximation
    # pooling 6 seeds divides it by about sqrt(6); needing 4 tests at once raises it
    six = mde_paired(6000, 0.08)
    assert six == pytest.approx(one / math.sqrt(6), rel=0.1) and mde_paired(6000, 0.08, tests=4) > six
    assert mde_paired(6000, 0.08, alpha=0.0125) > six
    # at the MDE the exact test's power is 80%: simulated
    rng = np.random.default_rng(0)
    q = 0.5 + six / (2 * 0.08)
    m = round(6000 * 0.08)
    k = next(k for k in range(m + 1) if binom_tail(k, m) < 0.05)
    assert np.mean(rng.binomial(m, q, 20000) >= k) == pytest.approx(0.8, abs=0.015)
    assert mde_paired(20, 0.05) == float("inf")  # one discordant prompt: nothing can reach alpha
    with pytest.raises(ValueError, match="discordant"):
        mde_paired(100, 1.5)
    # non-inferiority: declared with 80% power while the true deficit is below margin - 2.49 se
    assert mde_margin(6000, 0.15, 0.02) == pytest.approx(-0.02 + 2.486 * math.sqrt(0.15 / 6000), abs=1e-4)


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0
    assert normalized_edit_distance("abcd > dcba", "abcd > dcba") == 0.0
    assert normalized_edit_distance("abcd", "abce") == pytest.approx(0.25)
    assert normalized_edit_distance("", "") == 0.0 and normalized_edit_distance("xy", "") == 1.0


def _world(curves: dict, n=1000, seeds=(0, 1)):
    """Outcomes per (seed, label) from accuracies: prompt i is right when i < acc * n, so a policy with a higher
    accuracy is right on a superset of prompts (every discordant pair points one way). `curves`: {method: [acc of
    iteration 0, 1, ...]} and {label: acc} for single models."""
    def vec(acc):
        return [i < round(acc * n) for i in range(n)]

    def outcomes(seed, label):
        if label in curves and not isinstance(curves[label], list):
            return vec(curves[label])
        method, _, it = label.partition("/iter")
        return vec(curves[method][int(it)])

    return outcomes


def test_claim_verdicts_follow_their_definitions():
    up = [0.53, 0.56, 0.59, 0.62]  # +3 points per step: significant every step
    down = [0.53, 0.48, 0.44, 0.40]
    flat = [0.5, 0.5, 0.5, 0.5]
    # (a1) and (b): T-SPIN improves every step and equals SFT continued; the extra arm is far below SFT-100 (pi_0)
    w = _world({"pi_0": 0.5, "tspin": up, "sft_cont": 0.62, "pt_tspin": [0.2] * 4})
    c = main_claims(w, [0, 1], 4)
    assert (c["a1"]["verdict"], c["b"]["verdict"], c["b_from_pretrained"]["verdict"]) == (
        "supported", "supported", "contradicted")
    c = main_claims(_world({"pi_0": 0.5, "tspin": down, "sft_cont": 0.62 + MARGIN + 0.05}), [0, 1], 4,
                    from_pretrained=False)
    assert (c["a1"]["verdict"], c["b"]["verdict"]) == ("contradicted", "contradicted")
    assert "b_from_pretrained" not in c
    c = main_claims(_world({"pi_0": 0.5, "tspin": flat, "sft_cont": 0.51}), [0, 1], 4, from_pretrained=False)
    assert c["a1"]["verdict"] == "not supported" and c["b"]["verdict"] == "supported"
    # (a2), (c) per stability setting: SPIN collapses and T-SPIN improves at lr A; the opposite at lr B
    st = {"pi_0": 0.5, "spin@A": down, "tspin@A": up, "tspin_nohist@A": down,
          "spin@B": up, "tspin@B": down, "tspin_nohist@B": up}
    c = stability_claims(_world(st), [0, 1], 4, ["A", "B"])
    assert {k: v["verdict"] for k, v in c["a2"]["per_setting"].items()} == {"A": "supported", "B": "contradicted"}
    assert {k: v["verdict"] for k, v in c["c"]["per_setting"].items()} == {"A": "supported", "B": "contradicted"}
    assert c["a2"]["verdict"] == c["c"]["verdict"] == "not supported"  # a claim must hold at every setting
    c = stability_claims(_world(st), [0, 1], 4, ["A"])
    assert c["a2"]["verdict"] == c["c"]["verdict"] == "supported"
    # flat everywhere: nothing declines, everything holds -> SPIN holds contradicts "SPIN is unstable"; equal ends
    flat_world = _world({"pi_0": 0.5, "spin@A": flat, "tspin@A": flat, "tspin_nohist@A": flat})
    c = stability_claims(flat_world, [0, 1], 4, ["A"])
    assert c["a2"]["verdict"] == "contradicted" and c["c"]["verdict"] == "not supported"
    assert c["c"]["per_setting"]["A"]["reading"] == f"no difference larger than {MARGIN}"
