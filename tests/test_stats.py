"""Paired tests: the exact McNemar test against hand-computed binomial tails, the paired bootstrap's
non-inferiority p-values, mean +- sd over seeds, and the claims' verdict rules on constructed outcomes."""

import math

import pytest

from tspin.experiments.claims import MARGIN, evaluate_claims
from tspin.experiments.stats import binom_tail, bootstrap_diff, mcnemar, mean_sd


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


def test_bootstrap_non_inferiority_margin():
    a, b = _pairs(both=600, a_only=10, b_only=10, neither=380)  # equal accuracy on 1000 prompts
    r = bootstrap_diff(a, b, margin=0.02, resamples=2000, seed=0)
    assert r["diff"] == 0.0 and r["p_noninferior"] < 0.01 and r["p_inferior"] > 0.99
    assert r["ci95"][0] < 0 < r["ci95"][1]
    assert bootstrap_diff(a, b, margin=0.02, resamples=2000, seed=0) == r  # seeded
    a, b = _pairs(both=500, a_only=80, b_only=10, neither=410)  # B worse by 0.07
    r = bootstrap_diff(a, b, margin=0.02, resamples=2000, seed=0)
    assert r["diff"] == pytest.approx(-0.07) and r["p_noninferior"] > 0.99 and r["p_inferior"] < 0.01


def test_mean_sd():
    r = mean_sd([0.5, 0.6, 0.7])
    assert r["mean"] == pytest.approx(0.6) and r["sd"] == pytest.approx(0.1) and r["n"] == 3
    assert mean_sd([0.4])["sd"] == 0.0
    with pytest.raises(ValueError):
        mean_sd([])


def _world(tspin, spin, nohist, sft100_acc, n=1000):
    """Outcomes per (seed, label) from per-iteration accuracies: prompt i is right when i < acc * n, so a policy
    with a higher accuracy is right on a superset of prompts (every discordant pair points one way)."""
    def vec(acc):
        return [i < round(acc * n) for i in range(n)]

    curves = {"tspin": tspin, "spin": spin, "tspin_nohist": nohist}

    def outcomes(seed, label):
        if label == "pi_0":
            return vec(0.5)
        if label == "sft100":
            return vec(sft100_acc)
        method, _, it = label.partition("/iter")
        return vec(curves[method][int(it)])

    return outcomes


def test_claim_verdicts_follow_their_definitions():
    up = [0.53, 0.56, 0.59, 0.62]  # +3 points per step: significant every step
    down = [0.53, 0.48, 0.44, 0.40]
    flat = [0.5, 0.5, 0.5, 0.5]
    c = evaluate_claims(_world(up, down, down, sft100_acc=0.62), [0, 1], 4)
    assert (c["a1"]["verdict"], c["a2"]["verdict"], c["a"]["verdict"]) == ("supported",) * 3
    assert c["b"]["verdict"] == "supported" and c["c"]["verdict"] == "supported"
    c = evaluate_claims(_world(down, up, up, sft100_acc=0.62 + 2 * MARGIN + 0.05), [0, 1], 4)
    assert (c["a1"]["verdict"], c["a2"]["verdict"], c["a"]["verdict"]) == ("contradicted",) * 3
    assert c["b"]["verdict"] == "contradicted" and c["c"]["verdict"] == "contradicted"
    c = evaluate_claims(_world(flat, flat, flat, sft100_acc=0.51), [0, 1], 4)
    assert {c[k]["verdict"] for k in ("a1", "a2", "a", "c")} == {"not supported"}
    assert "alpha" in c and c["definitions"]["b"].startswith("T-SPIN last iteration vs SFT-100")
