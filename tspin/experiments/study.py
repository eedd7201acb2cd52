"""`tspin study`: the demo's comparison with settings chosen on validation, replicated over seeds, pre-registered
pooled tests and a stability test.

    tspin study --out runs/study --jobs 2        # grid (seed 0, validation), every seed, tests, results

1. Grid (seed 0, validation prompts only): T-SPIN, SPIN and SFT continued over their grids; per method the point
   with the best validation exact match after the last iteration is chosen (ties: the smaller learning rate, then
   the smaller coefficient). T-SPIN without history runs at T-SPIN's choice (the paper's ablation: beta = 0, the
   rest the same).
2. Main seeds: per seed its own prompts, 25% subset, pi_0, proto and the chosen runs, plus the labelled
   from-pretrained extra; only the chosen policies are scored on the seed's test prompts.
3. Stability seeds (fresh: none is a main seed): T-SPIN, no-history and SPIN at alpha = lambda = 1 and two
   aggressive learning rates, fixed in advance (:data:`.preregistration.PREREGISTERED`).
4. Claims (:mod:`.claims`): a verdict per claim from pooled tests over the seeds, per-seed tests beside them.

Writes OUT/study.json (everything: the pre-registered section, settings, grid, validation numbers, choice, per
seed every scored model's per-prompt outcomes, steps, y' = y per iteration, p-values, verdicts, MDEs, runtime,
commit, versions, machine, load), OUT/study.png (mean +- sd over seeds) and OUT/study.md. Runs resume: start the
same command again after a kill.
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
from .claims import combined_a, main_claims, stability_claims
from .collect import collect_seed, outcome_reader
from .demo import plot_curves, settings
from .jobs import core_seconds, makespan, run_jobs
from .preregistration import PREREGISTERED, QUICK_DESIGN, comparisons, mde_table
from .report import markdown, summarize
from .runs import COEF, METHODS, SELFPLAY, run_name, seed_jobs, shared_jobs


def grid_points(grid: dict) -> dict[str, list[dict]]:
    """{method: [params, ...]}: the product of each method's value lists."""
    return {m: [dict(zip(g, values)) for values in itertools.product(*g.values())] for m, g in grid.items()}


def choose(out: Path, points: dict[str, list[dict]], seed: int) -> tuple[dict, dict]:
    """(chosen params per method, validation numbers of every grid point): read from the grid runs of `seed`.
    T-SPIN without history takes T-SPIN's choice."""
    chosen, table = {}, {}
    for method, plist in points.items():
        rows = []
        for params in plist:
            r = json.loads((out / f"seed{seed}" / "runs" / run_name(method, params) / "job.json").read_text())
            rows.append({"params": params, "val_exact_match": r["val_exact_match"],
                         "val_final": r["val_exact_match"][-1]})
        table[method] = rows
        coef = COEF.get(method)
        chosen[method] = min(rows, key=lambda x: (-x["val_final"], x["params"]["learning_rate"],
                                                  x["params"].get(coef, 0)))["params"]
    chosen["tspin_nohist"] = dict(chosen["tspin"])
    return {m: chosen[m] for m in METHODS}, table


def stability_runs(design: dict) -> dict[str, list[dict]]:
    """{``<method>@<setting>``: [params]}: the stability test's runs (setting: ``lr<rate>``)."""
    st = design["stability"]
    runs = {}
    for lr in st["learning_rates"]:
        for method in SELFPLAY:
            coef = {COEF[method]: st["alpha" if method != "spin" else "spin_lambda"]}
            runs[f"{method}@lr{lr:g}"] = [{"learning_rate": lr, **coef}]
    return runs


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


def run_study(out: str | Path, *, processes: int = 1, threads: int = 1, quick: bool = False,
              progress: bool = True) -> dict:
    out = Path(out)
    s = settings(quick)
    s.pop("chosen")  # the study chooses them
    s.pop("chosen_by")
    design = QUICK_DESIGN if quick else PREREGISTERED
    main_seeds, stab_seeds, grid_seed = design["seeds"]["main"], design["seeds"]["stability"], design["grid_seed"]
    points = grid_points(design["grid"])
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "study_settings.json"
    if recorded.exists() and json.loads(recorded.read_text()) != json.loads(json.dumps({"settings": s,
                                                                                         "design": design})):
        raise FileExistsError(f"{out} holds a study with other settings or another design; choose another --out")
    atomic_write_json(recorded, {"settings": s, "design": design})
    t0 = time.time()
    # taken at the start: the code that ran, and how busy the (possibly shared) machine was
    prov, load_start = provenance(), os.getloadavg()
    log = print if progress else (lambda _: None)
    stab = stability_runs(design)
    # phase 1: everything that does not depend on the choice (the stability runs too); nothing here reads the
    # test prompts
    jobs = shared_jobs(out, s)
    for seed in main_seeds:
        jobs += seed_jobs(out, s, seed, points if seed == grid_seed else {})
    for seed in stab_seeds:
        jobs += seed_jobs(out, s, seed, stab)
    results = run_jobs(jobs, processes=processes, threads=threads, log=log, prefix="[study 1/2]")
    phase1 = jobs
    chosen, grid_table = choose(out, points, grid_seed)
    log(f"[study] chosen on validation: {json.dumps(chosen)}")
    # phase 2: the chosen runs and the from-pretrained extra, then the test evaluations
    jobs = shared_jobs(out, s)
    for seed in main_seeds:
        jobs += seed_jobs(out, s, seed, {m: [chosen[m]] for m in METHODS}, test_runs=chosen,
                          from_pretrained=chosen["tspin"])
    for seed in stab_seeds:
        jobs += seed_jobs(out, s, seed, stab, test_runs={k: v[0] for k, v in stab.items()})
    results.update(run_jobs(jobs, processes=processes, threads=threads, log=log, prefix="[study 2/2]"))
    phase2 = [j for j in jobs if j.name not in {p.name for p in phase1}]
    on_cores = core_seconds(results)
    reader, it = outcome_reader(out), s["iterations"]
    per_seed = [{"role": "main", **collect_seed(out, seed, s, chosen, from_pretrained=chosen["tspin"])}
                for seed in main_seeds]
    per_seed += [{"role": "stability", **collect_seed(out, seed, s, {k: v[0] for k, v in stab.items()})}
                 for seed in stab_seeds]
    claims = {**main_claims(reader, main_seeds, it),
              **stability_claims(reader, stab_seeds, it, [f"lr{lr:g}" for lr in design["stability"]["learning_rates"]])}
    claims["a"] = combined_a(claims["a1"]["verdict"], claims["a2"]["verdict"])
    study = {
        "command": "tspin study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else None,
        "preregistered": design, **prov, "generation_backend": "hf",
        "runtime": {"wall_seconds_this_start": round(time.time() - t0, 1),
                    # 1, 5 and 15 minute load averages when this start began and when it ended
                    "load_average": {"start": [round(x, 2) for x in load_start],
                                     "end": [round(x, 2) for x in os.getloadavg()]},
                    "job_wall_seconds_total": round(sum(r["seconds"] for r in results.values()), 1),
                    "cpu_seconds_total": round(sum(r["cpu_seconds"] for r in results.values()), 1),
                    # what the measured CPU seconds take with 2 workers on 2 free cores (the two phases in turn)
                    "estimated_seconds_on_2_free_cores": round(
                        makespan(phase1, on_cores, 2) + makespan(phase2, on_cores, 2), 1),
                    "job_seconds": {name: [r["seconds"], r["cpu_seconds"]] for name, r in results.items()}},
        "processes": processes, "threads": threads, "settings": s, "pretrain_exact_match":
            results["pretrain"]["eval/exact_match"], "grid_validation": grid_table, "chosen": chosen,
        "claims": claims,
        "mde": mde_table(design, per_seed, it),
        "comparisons": comparisons(reader, main_seeds, it),
        "summary": summarize(per_seed),
        "per_seed": per_seed,
    }
    atomic_write_json(out / "study.json", study)
    atomic_write_text(out / "study.md", markdown(study))
    main_rows = [r for r in per_seed if r["role"] == "main"]

    def curve(r: dict, label: str) -> list[float]:
        return [r["models"]["pi_0"]["test"]] + [r["models"][f"{label}/iter{t}"]["test"] for t in range(it)]

    no_plot = plot_curves({m: [curve(r, m) for r in main_rows] for m in SELFPLAY},
                          {"SFT continued on 100%, same steps": [r["models"]["sft_cont"]["test"] for r in main_rows]},
                          out / "study.png", title=f"test exact match, mean ± sd over {len(main_rows)} seeds")
    print(markdown(study))
    print(f"[study] wrote {out}/study.json, study.md{'' if no_plot else ', study.png'}")
    return study
