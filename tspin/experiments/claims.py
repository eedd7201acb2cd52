"""The paper's claims as pre-registered tests on per-prompt test outcomes, and their verdicts.

Every test here is fixed before the study runs (:data:`RULES` is written into the results' ``preregistered``
section) and every verdict comes from a test pooled over the seeds; per-seed tests are reported beside it.

- A *step* of a method is iteration t against iteration t-1 (iteration 0 against pi_0).
- *Better* / *worse*: the exact one-sided CMH test for matched pairs pooled over seeds (:func:`.stats.cmh_paired`)
  at ALPHA. *At most MARGIN worse* (non-inferior): the pooled Wald test of :func:`.stats.paired_margin_test`.
  *No difference larger than MARGIN* (equivalent): its two one-sided tests. "Not better" is said only with the
  equivalence test; without it the words are "no consistent difference".
- A method *declines* when some step is significantly worse (Bonferroni over its steps: p < ALPHA / steps); it
  *holds* when it does not decline and every step is at most MARGIN worse than the one before (each p < ALPHA).

Claims (main study, the settings chosen on validation):
(a1) "T-SPIN improves every iteration": supported when every T-SPIN step is better; contradicted when T-SPIN
     declines.
(b)  "T-SPIN on 25% matches or beats SFT on 100%": T-SPIN's last iteration against SFT continued from pi_0 on
     100% for the same optimizer steps: supported when T-SPIN is at most MARGIN worse; contradicted when it is
     more than MARGIN worse (p_inferior < ALPHA).
Claims (stability test: fixed aggressive settings, fresh seeds), a verdict per learning rate:
(a2) "SPIN is unstable, T-SPIN is not": supported when SPIN declines and T-SPIN holds; contradicted when T-SPIN
     declines or SPIN holds.
(c)  "the history term matters": T-SPIN's last iteration against the no-history one's: supported when better,
     contradicted when worse.
A claim with several settings is supported (contradicted) when it is at every one; otherwise not supported.
(a) = (a1) and (a2): supported when both are, contradicted when either is.
"""

from __future__ import annotations

from collections.abc import Callable

from .stats import cmh_paired, mcnemar, paired_margin_test

ALPHA = 0.05
MARGIN = 0.02
Outcomes = Callable[[int, str], list]  # (seed, label) -> per-prompt exact-match outcomes on that seed's test prompts
VERDICTS = ("supported", "not supported", "contradicted")

RULES = {
    "alpha": ALPHA,
    "margin": MARGIN,
    "step": "iteration t vs t-1 (iteration 0 vs pi_0)",
    "better / worse": "exact one-sided CMH test for matched pairs pooled over the seeds (each seed a stratum with "
                      f"its own test prompts), p < {ALPHA}",
    "at most margin worse": f"pooled Wald test of the stratified accuracy difference, H0 diff <= -{MARGIN}, "
                            f"p < {ALPHA}",
    "equivalent": f"two one-sided pooled Wald tests, H0 |diff| >= {MARGIN}, p < {ALPHA}; 'not better' is said only "
                  "with it, otherwise 'no consistent difference'",
    "declines": f"some step is worse at p < {ALPHA} / steps (Bonferroni over the method's steps)",
    "holds": f"does not decline, and every step is at most {MARGIN} worse than the one before",
    "verdict": "from the pooled tests only; the per-seed tests are reported beside them (replication); a claim "
               "tested at several settings is supported (contradicted) when it is at every one",
    "a1": "every T-SPIN step is better [contradicted: T-SPIN declines]",
    "b": "T-SPIN's last iteration is at most margin worse than SFT continued from pi_0 on 100% for the same "
         "optimizer steps [contradicted: more than margin worse, p_inferior < alpha]",
    "b_from_pretrained": "extra, labelled: the earlier design's comparison: T-SPIN from an SFT-25% pi_0 (last "
                         "iteration) against SFT on 100% from the pretrained model (early-stopped); same rule as (b)",
    "a2": "per stability setting: SPIN declines and T-SPIN holds [contradicted: T-SPIN declines or SPIN holds]",
    "c": "per stability setting: T-SPIN's last iteration is better than the no-history one's [contradicted: worse]",
    "a": "supported if (a1) and (a2) are; contradicted if either is",
}


def labels(method: str, iterations: int, start: str = "pi_0") -> list[str]:
    return [start] + [f"{method}/iter{t}" for t in range(iterations)]


def _pairs(outcomes: Outcomes, seeds: list[int], a: str, b: str) -> list[tuple[list, list]]:
    return [(outcomes(s, a), outcomes(s, b)) for s in seeds]


def compare(outcomes: Outcomes, seeds: list[int], a: str, b: str) -> dict:
    """B against A: the pooled tests (better / worse, margin tests) and the exact McNemar test per seed."""
    pairs = _pairs(outcomes, seeds, a, b)
    return {"a": a, "b": b, "pooled": cmh_paired(pairs), "margin": paired_margin_test(pairs, MARGIN),
            "per_seed": [{"seed": s, **mcnemar(x, y)} for s, (x, y) in zip(seeds, pairs)]}


def reading(c: dict) -> str:
    """What one comparison supports, in the words the rules allow."""
    if c["pooled"]["p_b_better"] < ALPHA:
        return "better"
    if c["pooled"]["p_b_worse"] < ALPHA:
        return "worse"
    if c["margin"]["p_equivalent"] < ALPHA:
        return f"no difference larger than {MARGIN}"
    return "no consistent difference"


def trajectory(outcomes: Outcomes, seeds: list[int], method: str, iterations: int, start: str = "pi_0") -> dict:
    """Every step of a method, and whether it improves at every step, declines or holds."""
    seq = labels(method, iterations, start)
    steps = [compare(outcomes, seeds, a, b) for a, b in zip(seq, seq[1:])]
    declines = any(x["pooled"]["p_b_worse"] < ALPHA / len(steps) for x in steps)
    return {"method": method, "steps": steps, "improves": all(x["pooled"]["p_b_better"] < ALPHA for x in steps),
            "declines": declines,
            "holds": not declines and all(x["margin"]["p_noninferior"] < ALPHA for x in steps)}


def _verdict(supported: bool, contradicted: bool) -> str:
    return "supported" if supported else "contradicted" if contradicted else "not supported"


def _combine(verdicts: list[str]) -> str:
    """Several settings: supported (contradicted) when every one is, else not supported."""
    return verdicts[0] if len(set(verdicts)) == 1 else "not supported"


def _p(x: float) -> str:
    return f"{x:.2g}" if x >= 1e-3 else "<0.001"


def _margin_claim(c: dict) -> str:
    m = c["margin"]
    return _verdict(m["p_noninferior"] < ALPHA, m["p_inferior"] < ALPHA)


def _margin_evidence(c: dict) -> str:
    m, per = c["margin"], c["per_seed"]
    return (f"pooled diff {m['diff']:+.3f} (90% CI {m['ci90'][0]:+.3f}..{m['ci90'][1]:+.3f}; p at most {MARGIN} "
            f"worse {_p(m['p_noninferior'])}, p more than {MARGIN} worse {_p(m['p_inferior'])}, p better "
            f"{_p(c['pooled']['p_b_better'])}); per seed " + ", ".join(f"{x['diff']:+.3f}" for x in per))


def _steps_evidence(t: dict, key: str) -> str:
    return ", ".join(f"{_p(x['pooled'][key])} ({x['pooled']['diff']:+.3f})" for x in t["steps"])


def main_claims(outcomes: Outcomes, seeds: list[int], iterations: int, *, from_pretrained: bool = True) -> dict:
    """(a1), (b) and the labelled extra (b, from pretrained) on the main study's seeds."""
    last = f"/iter{iterations - 1}"
    tsp = trajectory(outcomes, seeds, "tspin", iterations)
    out = {"a1": {"claim": "T-SPIN improves every iteration", "rule": RULES["a1"],
                  "verdict": _verdict(tsp["improves"], tsp["declines"]),
                  "evidence": "pooled p better (diff) per step: " + _steps_evidence(tsp, "p_b_better"),
                  "trajectory": tsp}}
    b = compare(outcomes, seeds, "sft_cont", "tspin" + last)
    out["b"] = {"claim": "T-SPIN on 25% matches or beats SFT on 100% (continued from pi_0, same steps)",
                "rule": RULES["b"], "verdict": _margin_claim(b), "evidence": _margin_evidence(b), "test": b}
    if from_pretrained:
        x = compare(outcomes, seeds, "pi_0", "pt_tspin" + last)
        out["b_from_pretrained"] = {
            "claim": "extra: T-SPIN from an SFT-25% pi_0 matches or beats SFT on 100% from the pretrained model",
            "rule": RULES["b_from_pretrained"], "verdict": _margin_claim(x), "evidence": _margin_evidence(x),
            "test": x}
    return out


def stability_claims(outcomes: Outcomes, seeds: list[int], iterations: int, settings: list[str]) -> dict:
    """(a2) and (c) on the stability seeds, per setting (run names such as ``lr0.0003``: methods are labelled
    ``<method>@<setting>``)."""
    last = f"/iter{iterations - 1}"
    a2, c = {}, {}
    for st in settings:
        tr = {m: trajectory(outcomes, seeds, f"{m}@{st}", iterations) for m in ("tspin", "tspin_nohist", "spin")}
        a2[st] = {"verdict": _verdict(tr["spin"]["declines"] and tr["tspin"]["holds"],
                                      tr["tspin"]["declines"] or tr["spin"]["holds"]),
                  "evidence": "; ".join(f"{m}: {'declines' if t['declines'] else 'holds' if t['holds'] else 'neither'}"
                                        f" (pooled p worse per step {_steps_evidence(t, 'p_b_worse')})"
                                        for m, t in tr.items()),
                  "trajectories": tr}
        h = compare(outcomes, seeds, f"tspin_nohist@{st}{last}", f"tspin@{st}{last}")
        c[st] = {"verdict": _verdict(h["pooled"]["p_b_better"] < ALPHA, h["pooled"]["p_b_worse"] < ALPHA),
                 "reading": reading(h),
                 "evidence": f"T-SPIN - no history at the last iteration: pooled {h['pooled']['diff']:+.3f} (p better "
                             f"{_p(h['pooled']['p_b_better'])}, p worse {_p(h['pooled']['p_b_worse'])}); per seed "
                             + ", ".join(f"{x['diff']:+.3f}" for x in h["per_seed"]),
                 "test": h}
    return {"a2": {"claim": "SPIN is unstable, T-SPIN is not", "rule": RULES["a2"],
                   "verdict": _combine([v["verdict"] for v in a2.values()]), "per_setting": a2},
            "c": {"claim": "the history term matters (T-SPIN ends above T-SPIN without it)", "rule": RULES["c"],
                  "verdict": _combine([v["verdict"] for v in c.values()]), "per_setting": c}}


def combined_a(a1: str, a2: str) -> dict:
    return {"claim": "T-SPIN improves every iteration while SPIN is unstable", "rule": RULES["a"],
            "verdict": _verdict(a1 == a2 == "supported", "contradicted" in (a1, a2)),
            "evidence": f"(a1) {a1}, (a2) {a2}"}
