"""`tspin demo`: the paper's comparison at laptop scale, end to end on CPU, for one seed with the settings the study
(:mod:`tspin.experiments.study`) chose on the validation split.

1. a tiny Llama is pretrained (causal LM) on raw, untemplated documents over a family of 12 string operations;
2. instruction SFT on 25% of the annotations of 6 of them, early-stopped on validation -> pi_0; the same on 100%;
   SFT on 25% for the optimizer steps SFT-100 took (matched steps);
3. from pi_0, 4 iterations each of T-SPIN, T-SPIN without the history term, SPIN and SFT continued on the same 25%;
4. every chosen policy is scored on 1000 test prompts (exact match), with exact McNemar tests between iterations.

The world (task, tokenizer, model): :mod:`tspin.experiments.task`; the runs as jobs: :mod:`tspin.experiments.runs`.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text
from .claims import steps
from .jobs import makespan, run_jobs
from .runs import METHODS, data_job, demo_config, read_outcomes, run_name, seed_jobs
from .task import LETTERS, build_model, build_tokenizer, make_task  # noqa: F401 (the demo's world, for tests)

__all__ = ["DEMO_SETTINGS", "LETTERS", "build_model", "build_tokenizer", "demo_config", "make_task", "pick_backend",
           "run_demo"]

# Sizes: the demo must finish within 10 minutes on 2 CPU cores. `chosen`: each self-play method's settings, chosen
# by `tspin study` on the validation split (docs/results/study.json records the grid and the validation numbers).
DEMO_SETTINGS = dict(
    n_train=4000, n_val=500, n_test=1000, n_corpus=48000, n_corpus_eval=500, min_len=4, max_len=8,
    model=dict(hidden=128, layers=4, heads=4),
    pretrain=dict(lr=3e-3, batch_size=32, epochs=1.0),
    sft=dict(lr=5e-4, max_epochs=10, patience=2),
    iterations=4, selfplay_epochs=1.0, temperature=1.0, beta=0.1, spin_mix_previous=True,
    chosen={"tspin": {"learning_rate": 3e-5, "alpha": 0.1}, "tspin_nohist": {"learning_rate": 3e-5, "alpha": 0.1},
            "spin": {"learning_rate": 1e-5, "spin_lambda": 0.1}, "sft25_cont": {"learning_rate": 1e-4}},
)
# --quick: seconds, for tests (head_dim 32: the smallest vLLM's CPU attention takes, for --backend vllm)
QUICK = dict(n_train=48, n_val=12, n_test=16, n_corpus=96, n_corpus_eval=8, model=dict(hidden=32, layers=1, heads=1),
             sft=dict(lr=2e-3, max_epochs=2, patience=1), iterations=2)


def settings(quick: bool = False) -> dict:
    return json.loads(json.dumps({**DEMO_SETTINGS, **(QUICK if quick else {})}))  # a deep copy, JSON-clean


# ----------------------------------------------------------------------------- one seed's numbers
def outcome_reader(out: Path):
    """(seed, label) -> the per-prompt test outcomes of that policy (labels: pi_0, sft100, sft25_matched,
    <method>/iter<t>), read once."""
    @functools.cache
    def read(seed: int, label: str) -> tuple[bool, ...]:
        method, _, it = label.partition("/")
        return tuple(read_outcomes(out / f"seed{seed}" / "test" / (method if it else "sft"), label))

    return read


def collect_seed(out: Path, seed: int, s: dict, chosen: dict) -> dict:
    """Everything measured for one seed: pretraining, the SFT models and each chosen method per iteration (test
    exact match, validation exact match, y' = y on the training prompts, training diagnostics), plus exact McNemar
    tests of every iteration against the one before it (iteration 0 against pi_0)."""
    d = out / f"seed{seed}"
    job = lambda name: json.loads((d / name / "job.json").read_text())  # noqa: E731
    sft_test = job("test/sft")
    r = {"seed": seed, "pretrain": {"raw_exact_match": job("pretrain")["eval/exact_match"]}, "sft": {},
         "methods": {}, "proto_y_eq_real": job("proto")["y_eq_real"]}
    for label, name in (("pi_0", "sft25"), ("sft100", "sft100"), ("sft25_matched", "sft25_matched")):
        j = job(name)
        r["sft"][label] = {"test": sft_test[label]["eval/exact_match"], "val": j["val_exact_match"],
                           **{k: j[k] for k in ("best_epoch", "steps_to_best", "steps") if k in j}}
    outcomes = outcome_reader(out)
    for method, params in chosen.items():
        run, test = job(f"runs/{run_name(method, params)}"), job(f"test/{method}")
        labels = [f"{method}/iter{t}" for t in range(s["iterations"])]
        r["methods"][method] = {
            "params": params, "run": run_name(method, params),
            "test": [sft_test["pi_0"]["eval/exact_match"]] + [test[x]["eval/exact_match"] for x in labels],
            "test_logps_real": [sft_test["pi_0"]["eval/logps/real"]] + [test[x]["eval/logps/real"] for x in labels],
            "val": run["val_exact_match"], "y_eq_real": run["y_eq_real"], "train": run["train"],
            "steps": steps(outcomes, seed, method, s["iterations"]),
        }
    r["seconds"] = {p.parent.relative_to(d).as_posix(): json.loads(p.read_text())["seconds"]
                    for p in sorted(d.rglob("job.json"))}
    return r


# ----------------------------------------------------------------------------- table and plot
YEQ = "y'=y"


def table(r: dict) -> str:
    """One seed's test results: per policy, test exact match, validation exact match, y' = y, and the exact McNemar
    p-value (two-sided) against the previous iteration."""
    head = f"{'policy':<22} {'test EM':>8} {'val EM':>7} {YEQ:>6} {'p vs prev':>10}"
    lines = [head, "-" * len(head), f"{'pretrained (raw fmt)':<22} {'-':>8} {'-':>7} {'-':>6} {'-':>10}"
             f"   raw-format EM {r['pretrain']['raw_exact_match']:.3f}"]
    for label, x in r["sft"].items():
        val = x["val"][x.get("best_epoch", 0) - 1]  # the chosen epoch's (sft25_matched: the last one's)
        y = r["proto_y_eq_real"] if label == "pi_0" else float("nan")
        lines.append(f"{label:<22} {x['test']:>8.3f} {val:>7.3f} {y:>6.3f} {'-':>10}")
    for method, m in r["methods"].items():
        for t in range(len(m["test"]) - 1):
            y = m["y_eq_real"][t] if m["y_eq_real"] else float("nan")
            lines.append(f"{method + f' iter{t}':<22} {m['test'][t + 1]:>8.3f} {m['val'][t + 1]:>7.3f} {y:>6.3f} "
                         f"{m['steps'][t]['p_two_sided']:>10.3g}")
    return "\n".join(lines).replace("nan", "  -")


def plot_curves(curves: dict[str, list[list[float]]], refs: dict[str, list[float]], path: Path, *,
                title: str) -> str | None:
    """Mean +- sd over seeds of each method's test exact match per iteration (x = 0: pi_0), with horizontal
    reference lines (mean over seeds); returns why not when matplotlib (the `plot` extra) is missing."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install 'tspin[plot]')"
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in curves.items():
        y = np.asarray(runs, dtype=float)
        mean, sd = y.mean(0), (y.std(0, ddof=1) if len(y) > 1 else np.zeros(y.shape[1]))
        xs = np.arange(y.shape[1])
        ax.plot(xs, mean, marker="o", label=method)
        ax.fill_between(xs, mean - sd, mean + sd, alpha=0.2)
    for (label, values), style in zip(refs.items(), ("--", ":", "-.")):
        ax.axhline(float(np.mean(values)), color="k", ls=style, lw=1, label=label)
    n = max(len(c[0]) for c in curves.values())
    ax.set_xticks(range(n), ["pi_0"] + [f"iter{t}" for t in range(n - 1)])  # the tables' labels
    ax.set_xlabel("policy (pi_0: SFT on 25%; iter t: after self-play iteration t)")
    ax.set_ylabel("test exact match")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return None


# ----------------------------------------------------------------------------- the command
def pick_backend(backend: str = "auto") -> tuple[str, str]:
    """(backend, a line saying which one samples and why): 'auto' is vLLM when it is installed, else HF generate."""
    from .. import vllm_engine

    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"--backend={backend!r}: expected auto, hf or vllm")
    if backend == "hf":
        return "hf", "hf (transformers generate; chosen with --backend hf)"
    if backend == "vllm":
        vllm_engine.require_vllm()  # VLLMNotInstalledError, naming the extra
        return "vllm", f"vllm ({vllm_engine.version()}; chosen with --backend vllm)"
    if vllm_engine.available():
        return "vllm", f"vllm ({vllm_engine.version()}; picked by --backend auto: it is installed)"
    return "hf", ("hf (transformers generate; picked by --backend auto: vLLM is not installed; pip install "
                  "'tspin[vllm]', or on a CPU `make install-vllm`, to sample with it)")


def run_demo(out: str | Path, *, quick: bool = False, resume: bool = False, progress: bool = True,
             threads: int = 1, processes: int = 1, seed: int = 0, backend: str = "auto") -> dict:
    out = Path(out)
    s = settings(quick)
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    if previous is not None and not resume:
        raise FileExistsError(f"{out} already holds a finished demo; pass --resume or choose another --out")
    if previous is not None and (previous.get("settings"), previous.get("seed")) != (s, seed):
        raise FileExistsError(f"{out} holds a demo with other settings ({'--quick' if quick else 'full size'}, seed "
                              f"{seed} asked); choose another --out")
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    backend, backend_line = pick_backend(backend)
    print(f"[demo] generation backend: {backend_line}", flush=True)
    t0 = time.time()
    chosen = s["chosen"]
    jobs = [data_job(out, s)] + seed_jobs(out, s, seed, {m: [chosen[m]] for m in METHODS}, test_runs=chosen,
                                          progress=progress and processes == 1, backend=backend)
    all_done = all(j.done() for j in jobs)
    results = run_jobs(jobs, processes=processes, threads=threads, prefix="[demo]")
    r = collect_seed(out, seed, s, chosen)
    cpu = {name: x["cpu_seconds"] for name, x in results.items()}
    summary = {"settings": s, "seed": seed, "processes": processes, "threads": threads,
               "generation_backend": backend_line, "result": r,
               "seconds": previous["seconds"] if all_done and previous else round(time.time() - t0, 1),
               "cpu_seconds": round(sum(cpu.values()), 1),
               "estimated_seconds_on_2_free_cores": round(makespan(jobs, cpu, 2), 1)}
    atomic_write_json(out / "summary.json", summary)
    text = table(r)
    atomic_write_text(out / "table.txt", text + "\n")
    no_plot = plot_curves({m: [x["test"]] for m, x in r["methods"].items()},
                          {"SFT 100%": [r["sft"]["sft100"]["test"]],
                           "SFT 25%, matched steps": [r["sft"]["sft25_matched"]["test"]]},
                          out / "curves.png", title=f"tspin demo, seed {seed}")
    print(text)
    print(f"[demo] wrote {out}/summary.json, table.txt{'' if no_plot else ', curves.png'} "
          f"({summary['seconds']:.0f} s wall, {summary['cpu_seconds']:.0f} CPU s; on 2 free cores about "
          f"{summary['estimated_seconds_on_2_free_cores']:.0f} s)")
    if no_plot:
        print(f"[demo] no curves.png: {no_plot}")
    return summary
