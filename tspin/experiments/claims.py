"""The paper's claims as pre-stated tests on per-prompt test outcomes, and the verdicts.

Definitions (fixed before any test number was looked at; written into the results with the verdicts):

- A *step* of a method is iteration t against iteration t-1, iteration 0 against pi_0 (4 steps for 4 iterations).
  A step is a *significant improvement* when the exact one-sided McNemar test (:func:`.stats.mcnemar`) on the
  test prompts gives p < ALPHA for "better", a *significant decline* when it gives p < ALPHA for "worse".
- A claim is **supported** when its test succeeds in every seed, **contradicted** when the opposite test succeeds
  in every seed, and **not supported** otherwise. Requiring every seed (not a pooled test) is the guard against
  a lucky seed; no further multiple-comparison correction is applied.

(a) "T-SPIN improves every iteration while SPIN is unstable": (a1) every T-SPIN step is a significant
    improvement [contradicted: some T-SPIN step is a significant decline]; (a2) some SPIN step is a significant
    decline [contradicted: every SPIN step is a significant improvement]. (a) is supported when both are,
    contradicted when either is.
(b) "T-SPIN on 25% matches or beats SFT on 100%": T-SPIN's last iteration against SFT-100 (early-stopped on
    validation), paired bootstrap of the exact-match difference with a non-inferiority margin of MARGIN:
    supported when p_noninferior < ALPHA (T-SPIN is worse by less than the margin), contradicted when
    p_inferior < ALPHA (SFT-100 is better by more than the margin).
(c) "The history term is what keeps T-SPIN stable": T-SPIN without the history term has a significant decline,
    T-SPIN has none, and T-SPIN's last iteration beats the no-history one's (one-sided McNemar, p < ALPHA)
    [contradicted: T-SPIN's last iteration is significantly worse than the no-history one's].
"""

from __future__ import annotations

from collections.abc import Callable

from .stats import bootstrap_diff, mcnemar, mean_sd

ALPHA = 0.05
MARGIN = 0.02
Outcomes = Callable[[int, str], list]  # (seed, label) -> per-prompt exact-match outcomes on the test prompts

DEFINITIONS = {
    "step": "iteration t vs t-1 (iteration 0 vs pi_0); exact one-sided McNemar on the test prompts, alpha "
            f"{ALPHA}: p_better < alpha = significant improvement, p_worse < alpha = significant decline",
    "verdict": "supported: the test succeeds in every seed; contradicted: the opposite test succeeds in every "
               "seed; otherwise not supported",
    "a1": "every T-SPIN step is a significant improvement [opposite: some T-SPIN step is a significant decline]",
    "a2": "some SPIN step is a significant decline [opposite: every SPIN step is a significant improvement]",
    "a": "supported if (a1) and (a2) are supported; contradicted if either is contradicted",
    "b": f"T-SPIN last iteration vs SFT-100 (early-stopped): paired bootstrap, 10000 resamples, margin {MARGIN}: "
         f"p_noninferior < {ALPHA} [opposite: p_inferior < {ALPHA}, SFT-100 better by more than the margin]",
    "c": "T-SPIN without history has a significant decline, T-SPIN has none, and T-SPIN's last iteration beats "
         "the no-history last iteration (one-sided McNemar p < alpha) [opposite: T-SPIN's last iteration is "
         "significantly worse than the no-history one]",
}


def labels(method: str, iterations: int) -> list[str]:
    return ["pi_0"] + [f"{method}/iter{t}" for t in range(iterations)]


def steps(outcomes: Outcomes, seed: int, method: str, iterations: int) -> list[dict]:
    seq = [outcomes(seed, x) for x in labels(method, iterations)]
    return [mcnemar(a, b) for a, b in zip(seq, seq[1:])]


def _verdict(ok: list[bool], opposite: list[bool]) -> str:
    if all(ok):
        return "supported"
    if all(opposite):
        return "contradicted"
    return "not supported"


def _p(x: float) -> str:
    return f"{x:.2g}" if x >= 1e-3 else "<0.001"


def evaluate_claims(outcomes: Outcomes, seeds: list[int], iterations: int) -> dict:
    last = f"/iter{iterations - 1}"
    out = {}
    st = {m: [steps(outcomes, s, m, iterations) for s in seeds] for m in ("tspin", "spin", "tspin_nohist")}
    improves = {m: [all(x["p_b_better"] < ALPHA for x in ss) for ss in st[m]] for m in st}
    declines = {m: [any(x["p_b_worse"] < ALPHA for x in ss) for ss in st[m]] for m in st}

    def step_ps(m, key):
        return "; ".join(f"seed {s}: " + ", ".join(_p(x[key]) for x in ss) for s, ss in zip(seeds, st[m]))

    out["a1"] = {"claim": "T-SPIN improves every iteration", "test": DEFINITIONS["a1"],
                 "verdict": _verdict(improves["tspin"], declines["tspin"]),
                 "evidence": f"p(better) per step: {step_ps('tspin', 'p_b_better')}",
                 "per_seed": [{"improves_every_step": i, "has_decline": d, "steps": ss}
                              for i, d, ss in zip(improves["tspin"], declines["tspin"], st["tspin"])]}
    out["a2"] = {"claim": "SPIN is unstable", "test": DEFINITIONS["a2"],
                 "verdict": _verdict(declines["spin"], improves["spin"]),
                 "evidence": f"p(worse) per step: {step_ps('spin', 'p_b_worse')}",
                 "per_seed": [{"improves_every_step": i, "has_decline": d, "steps": ss}
                              for i, d, ss in zip(improves["spin"], declines["spin"], st["spin"])]}
    v1, v2 = out["a1"]["verdict"], out["a2"]["verdict"]
    out["a"] = {"claim": "T-SPIN improves every iteration while SPIN is unstable", "test": DEFINITIONS["a"],
                "verdict": ("supported" if v1 == v2 == "supported" else
                            "contradicted" if "contradicted" in (v1, v2) else "not supported"),
                "evidence": f"(a1) {v1}, (a2) {v2}"}
    b = [bootstrap_diff(outcomes(s, "sft100"), outcomes(s, "tspin" + last), margin=MARGIN, seed=s) for s in seeds]
    out["b"] = {"claim": "T-SPIN on 25% matches or beats SFT on 100%", "test": DEFINITIONS["b"],
                "verdict": _verdict([x["p_noninferior"] < ALPHA for x in b], [x["p_inferior"] < ALPHA for x in b]),
                "evidence": "diff T-SPIN - SFT-100 per seed: " + "; ".join(
                    f"{x['diff']:+.3f} (p_noninferior {_p(x['p_noninferior'])}, p_inferior {_p(x['p_inferior'])})"
                    for x in b), "per_seed": b}
    final = [mcnemar(outcomes(s, "tspin_nohist" + last), outcomes(s, "tspin" + last)) for s in seeds]
    ok = [declines["tspin_nohist"][i] and not declines["tspin"][i] and final[i]["p_b_better"] < ALPHA
          for i in range(len(seeds))]
    out["c"] = {"claim": "the history term is what keeps T-SPIN stable", "test": DEFINITIONS["c"],
                "verdict": _verdict(ok, [x["p_b_worse"] < ALPHA for x in final]),
                "evidence": "per seed: " + "; ".join(
                    f"no-history declines {d}, T-SPIN declines {t}, last iteration diff {f['diff']:+.3f} "
                    f"(p_better {_p(f['p_b_better'])}, p_worse {_p(f['p_b_worse'])})"
                    for d, t, f in zip(declines["tspin_nohist"], declines["tspin"], final)),
                "per_seed": [{"nohist_declines": d, "tspin_declines": t, "last_iteration": f}
                             for d, t, f in zip(declines["tspin_nohist"], declines["tspin"], final)]}
    return {"definitions": DEFINITIONS, "alpha": ALPHA, "margin": MARGIN, **out}


def comparisons(outcomes: Outcomes, seeds: list[int], iterations: int, methods: tuple[str, ...]) -> list[dict]:
    """Every comparison of interest: B vs A, mean +- sd over seeds of acc(B) - acc(A), exact McNemar per seed."""
    last = f"/iter{iterations - 1}"
    pairs = [(a, b) for m in methods for a, b in zip(labels(m, iterations), labels(m, iterations)[1:])]
    pairs += [("sft100", m + last) for m in methods] + [("spin" + last, "tspin" + last),
                                                       ("tspin_nohist" + last, "tspin" + last),
                                                       ("sft25_cont" + last, "tspin" + last),
                                                       ("pi_0", "sft100"), ("pi_0", "sft25_matched"),
                                                       ("sft25_matched", "sft100")]
    rows = []
    for a, b in pairs:
        tests = [mcnemar(outcomes(s, a), outcomes(s, b)) for s in seeds]
        rows.append({"a": a, "b": b, "diff": mean_sd([t["diff"] for t in tests]),
                     "p_two_sided": [t["p_two_sided"] for t in tests], "p_b_better": [t["p_b_better"] for t in tests],
                     "p_b_worse": [t["p_b_worse"] for t in tests]})
    return rows
