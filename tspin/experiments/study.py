"""`tspin study`: the demo's comparison with settings chosen on validation, several seeds and paired tests.

    tspin study --out runs/study --jobs 2        # grid (seed 0, validation), then every seed, tests, results

1. Grid (seed 0): every self-play method over its grid of learning rates (and SPIN's lambda / T-SPIN's alpha),
   scored on the **validation** prompts only; each method's setting with the best validation exact match after
   the last iteration is chosen (ties: the smaller learning rate, then the smaller coefficient).
2. Seeds: the whole pipeline (init, pretraining, SFT, proto, the chosen runs) for every seed; only the chosen
   policies are scored on the test prompts.
3. Claims (:mod:`tspin.experiments.claims`): each of the paper's claims gets a verdict from exact paired tests per seed.

Writes OUT/study.json (everything: settings, grid, validation numbers, choice, per seed/method/iteration results,
p-values, verdicts, runtime, commit, versions, machine), OUT/study.png (mean +- sd over seeds) and OUT/study.md.
Runs resume: start the same command again after a kill.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text
from .claims import comparisons, evaluate_claims
from .demo import collect_seed, outcome_reader, plot_curves, settings
from .jobs import makespan, run_jobs
from .runs import COEF, METHODS, data_job, run_name, seed_jobs
from .stats import mean_sd

# The learning rates bracket what exploration on the validation split showed: at 1e-3 T-SPIN and SPIN collapsed
# (validation exact match to ~0.1 within one iteration), at 1e-5 they barely move.
GRID = {
    "tspin": {"learning_rate": [1e-5, 3e-5, 1e-4, 3e-4], "alpha": [0.1, 1.0]},
    "tspin_nohist": {"learning_rate": [1e-5, 3e-5, 1e-4, 3e-4], "alpha": [0.1, 1.0]},
    "spin": {"learning_rate": [1e-5, 3e-5, 1e-4, 3e-4], "spin_lambda": [0.1, 1.0]},
    "sft25_cont": {"learning_rate": [1e-4, 3e-4, 1e-3]},
}
QUICK_GRID = {"tspin": {"learning_rate": [1e-4, 1e-3], "alpha": [1.0]}, "tspin_nohist": {"learning_rate": [1e-3],
              "alpha": [1.0]}, "spin": {"learning_rate": [1e-3], "spin_lambda": [0.1]},
              "sft25_cont": {"learning_rate": [1e-3]}}
SELECTION_RULE = ("per method, the grid point with the highest validation exact match after the last self-play "
                  "iteration (seed 0); ties go to the smaller learning rate, then the smaller coefficient")


def grid_points(grid: dict) -> dict[str, list[dict]]:
    """{method: [params, ...]}: the product of each method's value lists."""
    return {m: [dict(zip(g, values)) for values in itertools.product(*g.values())] for m, g in grid.items()}


def choose(out: Path, points: dict[str, list[dict]]) -> tuple[dict, dict]:
    """(chosen params per method, validation numbers of every grid point): read from the grid runs of seed 0."""
    chosen, table = {}, {}
    for method, plist in points.items():
        rows = []
        for params in plist:
            r = json.loads((out / "seed0" / "runs" / run_name(method, params) / "job.json").read_text())
            rows.append({"params": params, "val_exact_match": r["val_exact_match"],
                         "val_final": r["val_exact_match"][-1]})
        table[method] = rows
        coef = COEF.get(method)
        chosen[method] = min(rows, key=lambda x: (-x["val_final"], x["params"]["learning_rate"],
                                                  x["params"].get(coef, 0)))["params"]
    return chosen, table


def provenance() -> dict:
    import torch
    import transformers

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), None)
    except OSError:
        pass
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "machine": {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()}}


def summarize(per_seed: list[dict]) -> dict:
    """Mean +- sd over seeds of every curve and reference number."""
    methods = per_seed[0]["methods"]
    out = {"pretrain_raw_exact_match": mean_sd([r["pretrain"]["raw_exact_match"] for r in per_seed]),
           "proto_y_eq_real": mean_sd([r["proto_y_eq_real"] for r in per_seed]),
           "sft": {k: mean_sd([r["sft"][k]["test"] for r in per_seed]) for k in per_seed[0]["sft"]}, "methods": {}}
    for m in methods:
        curves = [r["methods"][m] for r in per_seed]
        out["methods"][m] = {
            "test": [mean_sd([c["test"][t] for c in curves]) for t in range(len(curves[0]["test"]))],
            "val": [mean_sd([c["val"][t] for c in curves]) for t in range(len(curves[0]["val"]))],
            "y_eq_real": ([mean_sd([c["y_eq_real"][t] for c in curves]) for t in range(len(curves[0]["y_eq_real"]))]
                          if curves[0]["y_eq_real"] else None)}
    return out


def markdown(study: dict) -> str:
    """The README's tables: test exact match per method and iteration (mean +- sd), y' = y, and the verdicts."""
    sm, it = study["summary"], study["settings"]["iterations"]
    fmt = lambda x: f"{x['mean']:.3f} ± {x['sd']:.3f}"  # noqa: E731
    lines = ["| policy | " + " | ".join(["pi_0"] + [f"iter{t}" for t in range(it)]) + " |",
             "|---" * (it + 2) + "|"]
    for m, x in sm["methods"].items():
        lines.append(f"| {m} | " + " | ".join(fmt(v) for v in x["test"]) + " |")
    lines += ["", "| reference | test exact match |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in sm["sft"].items()]
    lines += ["", "| y' = y on the training prompts | " + " | ".join(f"iter{t}" for t in range(it)) + " |",
              "|---" * (it + 1) + "|"]
    for m, x in sm["methods"].items():
        if x["y_eq_real"]:
            lines.append(f"| {m} | " + " | ".join(fmt(v) for v in x["y_eq_real"]) + " |")
    lines += ["", "| claim | verdict | test |", "|---|---|---|"]
    for key in ("a1", "a2", "a", "b", "c"):
        c = study["claims"][key]
        lines.append(f"| ({key}) {c['claim']} | **{c['verdict']}** | {c['evidence']} |")
    return "\n".join(lines) + "\n"


def run_study(out: str | Path, *, seeds: int = 3, processes: int = 1, threads: int = 1, quick: bool = False,
              progress: bool = True) -> dict:
    out = Path(out)
    s = settings(quick)
    s.pop("chosen")  # the study chooses them
    grid = QUICK_GRID if quick else GRID
    points = grid_points(grid)
    (out).mkdir(parents=True, exist_ok=True)
    recorded = out / "study_settings.json"
    if recorded.exists() and json.loads(recorded.read_text()) != {"settings": s, "grid": grid, "seeds": seeds}:
        raise FileExistsError(f"{out} holds a study with other settings, grid or seeds; choose another --out")
    atomic_write_json(recorded, {"settings": s, "grid": grid, "seeds": seeds})
    t0 = time.time()
    # taken at the start: the code that ran, and how busy the (possibly shared) machine was
    prov, load_start = provenance(), os.getloadavg()
    log = print if progress else (lambda _: None)
    # phase 1: everything that does not depend on the choice; nothing here reads the test prompts
    jobs = [data_job(out, s)] + seed_jobs(out, s, 0, points)
    for seed in range(1, seeds):
        jobs += seed_jobs(out, s, seed, {})
    results = run_jobs(jobs, processes=processes, threads=threads, log=log, prefix="[study 1/2]")
    phase1 = jobs
    chosen, grid_table = choose(out, points)
    log(f"[study] chosen on validation: {json.dumps(chosen)}")
    # phase 2: the chosen runs for every seed, then the test evaluations of the chosen policies only
    jobs = [data_job(out, s)]
    for seed in range(seeds):
        jobs += seed_jobs(out, s, seed, {m: [chosen[m]] for m in METHODS}, test_runs=chosen)
    results.update(run_jobs(jobs, processes=processes, threads=threads, log=log, prefix="[study 2/2]"))
    phase2 = [j for j in jobs if j.name not in {p.name for p in phase1}]
    cpu = {name: r["cpu_seconds"] for name, r in results.items()}
    per_seed = [collect_seed(out, seed, s, chosen) for seed in range(seeds)]
    study = {
        "command": "tspin study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else None,
        **prov, "generation_backend": "hf",
        "runtime": {"wall_seconds_this_start": round(time.time() - t0, 1),
                    # 1, 5 and 15 minute load averages when this start began and when it ended
                    "load_average": {"start": [round(x, 2) for x in load_start],
                                     "end": [round(x, 2) for x in os.getloadavg()]},
                    "job_wall_seconds_total": round(sum(r["seconds"] for r in results.values()), 1),
                    "cpu_seconds_total": round(sum(cpu.values()), 1),
                    # what the measured CPU seconds take with 2 workers on 2 free cores (the two phases in turn)
                    "estimated_seconds_on_2_free_cores": round(makespan(phase1, cpu, 2) + makespan(phase2, cpu, 2),
                                                               1),
                    "job_seconds": {name: [r["seconds"], r["cpu_seconds"]] for name, r in results.items()}},
        "processes": processes, "threads": threads, "settings": s, "seeds": list(range(seeds)),
        "grid": grid, "selection_rule": SELECTION_RULE, "grid_validation": grid_table, "chosen": chosen,
        "claims": evaluate_claims(outcome_reader(out), list(range(seeds)), s["iterations"]),
        "comparisons": comparisons(outcome_reader(out), list(range(seeds)), s["iterations"], METHODS),
        "summary": summarize(per_seed),
        "per_seed": per_seed,
    }
    atomic_write_json(out / "study.json", study)
    atomic_write_text(out / "study.md", markdown(study))
    sm = study["summary"]
    no_plot = plot_curves({m: [r["methods"][m]["test"] for r in per_seed] for m in METHODS},
                          {"SFT 100%": sm["sft"]["sft100"]["values"],
                           "SFT 25%, matched steps": sm["sft"]["sft25_matched"]["values"]},
                          out / "study.png", title=f"test exact match, mean ± sd over {seeds} seeds")
    print(markdown(study))
    print(f"[study] wrote {out}/study.json, study.md{'' if no_plot else ', study.png'}")
    return study
