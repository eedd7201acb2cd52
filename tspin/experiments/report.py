"""The study's tables: mean +- sd over seeds of every scored model, y' = y per iteration, steps, the verdicts."""

from __future__ import annotations

from .stats import mean_sd


def summarize(per_seed: list[dict]) -> dict:
    """Per role (main, stability): mean +- sd over its seeds of every scored model's test exact match, normalized
    edit distance and steps, and of every run's y' = y per iteration."""
    out = {}
    for role in ("main", "stability"):
        rows = [r for r in per_seed if r["role"] == role]
        if not rows:
            continue
        models = {label: {k: mean_sd([r["models"][label][k] for r in rows]) for k in ("test", "edit_distance", "steps")}
                  for label in rows[0]["models"]}
        same = {label: [mean_sd([r["runs"][label]["same_as_real"][t] for r in rows])
                        for t in range(len(x["same_as_real"]))]
                for label, x in rows[0]["runs"].items() if x["same_as_real"]}
        out[role] = {"seeds": [r["seed"] for r in rows], "models": models, "same_as_real": same,
                     "proto_same_as_real": mean_sd([r["proto_same_as_real"] for r in rows]),
                     "pi_0_stopped_by": [r["pi_0"]["stopped_by"] for r in rows],
                     "pi_0_best_round": [r["pi_0"]["best_round"] for r in rows]}
    return out


def _fmt(x: dict) -> str:
    return f"{x['mean']:.3f} ± {x['sd']:.3f}"


def _curve_table(models: dict, labels: list[str], iterations: int) -> list[str]:
    lines = ["| policy | " + " | ".join(["pi_0"] + [f"iter{t}" for t in range(iterations)]) + " |",
             "|---" * (iterations + 2) + "|"]
    for label in labels:
        cells = [_fmt(models["pi_0"]["test"])] + [_fmt(models[f"{label}/iter{t}"]["test"]) for t in range(iterations)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(study: dict) -> str:
    """Test exact match per method and iteration (mean +- sd over seeds), the references, y' = y, the verdicts."""
    sm, it = study["summary"], study["settings"]["iterations"]
    main = sm["main"]["models"]
    lines = [f"Main study, test exact match, mean ± sd over seeds {sm['main']['seeds']}:", ""]
    lines += _curve_table(main, ["tspin", "tspin_nohist", "spin"], it)
    lines += ["", "| reference | test exact match | normalized edit distance | optimizer steps |", "|---|---|---|---|"]
    last = f"/iter{it - 1}"
    for label in ["pi_0", "tspin" + last, "sft_cont", "pt_sft25", "pt_tspin" + last]:
        if label in main:
            m = main[label]
            lines.append(f"| {label} | {_fmt(m['test'])} | {_fmt(m['edit_distance'])} | {m['steps']['mean']:.0f} |")
    lines += ["", "| y' = y on the training prompts | " + " | ".join(f"iter{t}" for t in range(it)) + " |",
              "|---" * (it + 1) + "|"]
    for label, xs in sm["main"]["same_as_real"].items():
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in xs) + " |")
    if "stability" in sm:
        st = sm["stability"]["models"]
        labels = sorted({k.split("/")[0] for k in st if "@" in k})
        lines += ["", f"Stability test, test exact match, mean ± sd over seeds {sm['stability']['seeds']}:", ""]
        lines += _curve_table(st, labels, it)
    lines += ["", "| claim | verdict | evidence (pooled over seeds) |", "|---|---|---|"]
    c = study["claims"]
    for key in ("a1", "b", "b_from_pretrained"):
        if key in c:
            lines.append(f"| ({key}) {c[key]['claim']} | **{c[key]['verdict']}** | {c[key]['evidence']} |")
    for key in ("a2", "c"):
        per = "; ".join(f"{st}: {v['verdict']} ({v['evidence']})" for st, v in c[key]["per_setting"].items())
        lines.append(f"| ({key}) {c[key]['claim']} | **{c[key]['verdict']}** | {per} |")
    lines.append(f"| (a) {c['a']['claim']} | **{c['a']['verdict']}** | {c['a']['evidence']} |")
    lines += ["", "| comparison (B vs A, last iterations) | diff B - A | reading |", "|---|---|---|"]
    for x in study["comparisons"]:
        lines.append(f"| {x['b']} vs {x['a']} | {x['pooled']['diff']:+.3f} | {x['reading']} |")
    return "\n".join(lines) + "\n"
