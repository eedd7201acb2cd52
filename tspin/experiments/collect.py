"""One seed's results from its finished jobs: every scored model's test exact match, per-prompt outcomes (a 0/1
string in test-prompt order), token-level score and training steps; every run's validation curve, y' = y per
iteration, steps and examples per iteration. What the demo prints and the study stores."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..evaluation import answer_key
from .runs import read_test_rows, run_name
from .task import ANSWER_PATTERN

# what the results keep of an early-stopped SFT (pi_0, pi_0'): its rounds' validation curve, the best round, why it
# stopped, validation exact match after the cooldown, and its optimizer steps in all
SFT_KEYS = ("val_exact_match", "best_round", "stopped_by", "val_final", "steps_to_best")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character = one token of the demo)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def normalized_edit_distance(answer: str, real: str, pattern: str | None = ANSWER_PATTERN) -> float:
    """Edit distance over the longer string's length: 0 for an exact answer, 1 for one sharing nothing; over what
    exact match compares (:func:`tspin.evaluation.answer_key`: the step results, one space between them, whatever
    separator the annotator chose)."""
    def text(x: str) -> str:
        key = answer_key(x, pattern)
        return key if pattern is None else " ".join(key)

    a, r = text(answer), text(real)
    return edit_distance(a, r) / max(len(a), len(r), 1)


def outcome_reader(out: Path):
    """(seed, label) -> that policy's per-prompt exact-match outcomes on the seed's test prompts, read once."""
    @functools.cache
    def read(seed: int, label: str) -> tuple[bool, ...]:
        return tuple(r["exact"] for r in read_test_rows(Path(out) / f"seed{seed}" / "test", label))

    return read


def per_prompt_string(outcomes) -> str:
    return "".join("1" if x else "0" for x in outcomes)


def _scored(out: Path, seed: int, label: str, steps: int) -> dict:
    rows = read_test_rows(out / f"seed{seed}" / "test", label)
    return {"test": sum(r["exact"] for r in rows) / len(rows),
            "edit_distance": sum(normalized_edit_distance(r["greedy"], r["real"]) for r in rows) / len(rows),
            "steps": steps, "per_prompt": per_prompt_string(r["exact"] for r in rows)}


def collect_seed(out: Path, seed: int, s: dict, runs: dict[str, dict], from_pretrained: dict | None = None) -> dict:
    """Everything measured for one seed: pi_0 and the from-pretrained extra (validation curves, rounds, why the
    early stopping stopped), every run in `runs` ({label: params}; labels as in :func:`.runs.seed_jobs`) and every
    scored model (``models``: {label: test, edit_distance, steps since the pretrained model's instruction tuning
    began for pi_0 / pt_sft25 and since pi_0 for the runs, per_prompt})."""
    out = Path(out)
    d = out / f"seed{seed}"

    def job(name: str) -> dict:
        return json.loads((d / name / "job.json").read_text())

    pi0 = job("pi0")
    r = {"seed": seed, "pi_0": {k: pi0[k] for k in SFT_KEYS},
         "proto_same_as_real": job("proto")["same_as_real"], "runs": {}, "models": {}}
    r["models"]["pi_0"] = _scored(out, seed, "pi_0", pi0["steps_to_best"])
    all_runs = dict(runs, **({"pt_tspin": from_pretrained} if from_pretrained is not None else {}))
    for label, params in all_runs.items():
        if label == "pt_tspin":  # its start first
            pt = job("pt_sft25")
            r["pt_sft25"] = {k: pt[k] for k in SFT_KEYS}
            r["models"]["pt_sft25"] = _scored(out, seed, "pt_sft25", pt["steps_to_best"])
        method = label.partition("@")[0]
        run = job(f"runs/{run_name(method, params)}")
        r["runs"][label] = {"params": params, "run": run_name(method, params), "val": run["val_exact_match"],
                            "same_as_real": run["same_as_real"], "steps": run["steps"], "examples": run["examples"],
                            "pool": run["pool"], "train": run["train"]}
        if label == "sft_cont":
            r["models"][label] = _scored(out, seed, label, sum(run["steps"]))
        else:
            for t in range(len(run["steps"])):
                r["models"][f"{label}/iter{t}"] = {
                    **_scored(out, seed, f"{label}/iter{t}", sum(run["steps"][:t + 1])),
                    "same_as_real": run["same_as_real"][t]}  # of the samples this iteration trained on
    r["seconds"] = {p.parent.relative_to(d).as_posix(): json.loads(p.read_text())["seconds"]
                    for p in sorted(d.rglob("job.json"))}
    return r
