"""Recompute a study's verdicts and p-values from the per-prompt outcomes it stores (``per_prompt``: a 0/1 string
per scored model, in test-prompt order), so that anyone holding study.json can check every stored number."""

from __future__ import annotations

import json

from .claims import combined_a, main_claims, stability_claims
from .preregistration import comparisons


def stored_outcomes(study: dict):
    """(seed, label) -> the outcomes stored in `study` for that seed's model."""
    table = {(r["seed"], label): [c == "1" for c in m["per_prompt"]] for r in study["per_seed"]
             for label, m in r["models"].items()}

    def read(seed: int, label: str) -> list[bool]:
        try:
            return table[(seed, label)]
        except KeyError:
            raise KeyError(f"study.json: no per_prompt outcomes for seed {seed}, model {label!r}") from None

    return read


def recompute(study: dict) -> dict:
    """The claims and comparisons, computed afresh from the stored outcomes."""
    reader, it = stored_outcomes(study), study["settings"]["iterations"]
    design = study["preregistered"]
    main, stab = design["seeds"]["main"], design["seeds"]["stability"]
    claims = {**main_claims(reader, main, it),
              **stability_claims(reader, stab, it, [f"lr{lr:g}" for lr in design["stability"]["learning_rates"]])}
    claims["a"] = combined_a(claims["a1"]["verdict"], claims["a2"]["verdict"])
    return {"claims": claims, "comparisons": comparisons(reader, main, it)}


def differences(study: dict) -> list[str]:
    """Where the stored claims or comparisons differ from the recomputed ones (empty: every number recomputes)."""
    fresh = json.loads(json.dumps(recompute(study)))  # through JSON, as stored
    out = []

    def walk(path: str, a, b) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(f"{path}.{k}", a.get(k), b.get(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(f"{path}[{i}]", x, y)
        elif a != b:
            out.append(f"{path}: stored {a!r}, recomputed {b!r}")

    for key in ("claims", "comparisons"):
        walk(key, study[key], fresh[key])
    return out
