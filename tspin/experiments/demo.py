"""`tspin demo`: the paper's comparison at laptop scale, end to end on CPU, for one seed with the settings the study
(:mod:`tspin.experiments.study`) chose on the validation split.

1. a tiny Llama is pretrained (causal LM) on raw, untemplated documents: 12 string operations, alone and chained;
2. pi_0 = instruction SFT on all of the seed's annotated chained instructions, early-stopped on validation;
3. from pi_0, on a 25% subset, 4 iterations each of T-SPIN, T-SPIN without the history term and SPIN; and SFT
   continued from pi_0 on 100% for the same optimizer steps (the paper's SFT baseline);
4. the labelled extra of the earlier design: pi_0' = SFT on the 25% from the pretrained model, T-SPIN from it;
5. every chosen policy is scored on the seed's test prompts (exact match; normalized edit distance beside it),
   with exact McNemar tests between iterations.

The world (task, tokenizer, model): :mod:`tspin.experiments.task`; the runs as jobs: :mod:`tspin.experiments.runs`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text
from .collect import collect_seed
from .jobs import core_seconds, makespan, run_jobs
from .runs import METHODS, demo_config, seed_jobs, shared_jobs
from .stats import mcnemar
from .task import LETTERS, SEPARATORS, build_model, build_tokenizer, make_task  # noqa: F401 (the world, for tests)

__all__ = ["DEMO_SETTINGS", "LETTERS", "build_model", "build_tokenizer", "demo_config", "make_task", "pick_backend",
           "run_demo"]

# Sizes: the demo must finish within 10 minutes on 2 free CPU cores, the study within 90 (the pilots in
# docs/results/preregistration.md). n_train: 16384 prompts, so that pi_0 sees each a few times before it stops (on
# 4096, the second design, it memorized them: its own samples equalled the annotation on 57% of the 25% subset);
# pi_0's early stopping counts rounds of `round_examples` examples (128 steps; None: one epoch over its data); a
# self-play iteration samples the whole 25% subset and trains `selfplay_epochs` of an epoch over it (32 steps),
# so that SFT continued on 100% takes exactly the same 4 x 32 optimizer steps. `chosen`: each method's settings,
# chosen by `tspin study` on the validation prompts of seed 0 (the last iteration's exact match;
# docs/results/study.json records the grid and every validation number). task.separators: each annotation joins
# its steps with one of three separators (the fourth design: with one, a converged pi_0 sampled the annotation
# itself on 44% of the subset, where self-play's gradient vanishes); exact match scores the steps.
DEMO_SETTINGS = dict(
    n_train=16384, n_val=500, n_test=1000, n_corpus=64000, n_corpus_eval=500,
    task=dict(min_len=8, max_len=10, min_steps=3, max_steps=3, separators=list(SEPARATORS)),
    corpus=dict(min_len=4, max_len=10, max_steps=3),
    model=dict(hidden=64, layers=2, heads=2),  # head_dim 32: the smallest vLLM's CPU attention takes
    pretrain=dict(lr=3e-3, batch_size=32, epochs=1.0),
    sft=dict(lr=2e-3, round_examples=4096, max_rounds=60, patience=3, cooldown_rounds=1),
    fraction=0.25, iterations=4, selfplay_epochs=0.25, temperature=1.0, beta=0.1, spin_mix_previous=False,
    chosen={"tspin": {"learning_rate": 1e-5, "alpha": 0.1}, "tspin_nohist": {"learning_rate": 1e-5, "alpha": 0.1},
            "spin": {"learning_rate": 3e-5, "spin_lambda": 1.0}, "sft_cont": {"learning_rate": 1e-3}},
    chosen_by="tspin study (docs/results/study.json): seed 0's validation exact match after the last iteration",
)
# --quick: seconds, for tests (head_dim 32: the smallest vLLM's CPU attention takes, for --backend vllm)
QUICK = dict(n_train=64, n_val=12, n_test=16, n_corpus=96, n_corpus_eval=8, model=dict(hidden=32, layers=1, heads=1),
             sft=dict(lr=2e-3, round_examples=None, max_rounds=2, patience=1, cooldown_rounds=1), iterations=2,
             selfplay_epochs=1.0)


def settings(quick: bool = False) -> dict:
    return json.loads(json.dumps({**DEMO_SETTINGS, **(QUICK if quick else {})}))  # a deep copy, JSON-clean


# ----------------------------------------------------------------------------- table and plot
YEQ = "y'=y"


def table(r: dict) -> str:
    """One seed's test results: per scored policy, test exact match, normalized edit distance, validation exact
    match, y' = y on the training prompts, optimizer steps since pi_0 and the exact McNemar p-value (two-sided)
    against the previous iteration (iteration 0: against its start)."""
    head = f"{'policy':<24} {'test EM':>8} {'edit':>6} {'val EM':>7} {YEQ:>6} {'steps':>6} {'p vs prev':>10}"
    lines = [head, "-" * len(head)]
    reader = {label: [c == "1" for c in m["per_prompt"]] for label, m in r["models"].items()}
    for label, m in r["models"].items():
        run, _, it = label.partition("/iter")
        val, same, p = float("nan"), float("nan"), float("nan")
        if it:
            t = int(it)
            x = r["runs"][run]
            val = x["val"][t + 1]
            same = x["same_as_real"][t] if x["same_as_real"] else float("nan")
            prev = f"{run}/iter{t - 1}" if t else ("pt_sft25" if run == "pt_tspin" else "pi_0")
            p = mcnemar(reader[prev], reader[label])["p_two_sided"]
        elif label in ("pi_0", "pt_sft25"):
            x = r["pi_0" if label == "pi_0" else "pt_sft25"]
            val = x["val_final"]
            same = r["proto_same_as_real"] if label == "pi_0" else float("nan")
        elif label == "sft_cont":
            val = r["runs"]["sft_cont"]["val"][-1]
        lines.append(f"{label:<24} {m['test']:>8.3f} {m['edit_distance']:>6.3f} {val:>7.3f} {same:>6.3f} "
                     f"{m['steps']:>6} {p:>10.3g}")
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
    ax.set_xlabel("policy (pi_0: SFT on 100%, early-stopped; iter t: after self-play iteration t)")
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
    from ..generation import vllm_engine

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
    one = progress and processes == 1
    jobs = shared_jobs(out, s, progress=one, backend=backend) + seed_jobs(
        out, s, seed, {m: [chosen[m]] for m in METHODS}, test_runs=chosen, from_pretrained=chosen["tspin"],
        progress=one, backend=backend)
    all_done = all(j.done() for j in jobs)
    results = run_jobs(jobs, processes=processes, threads=threads, prefix="[demo]")
    r = collect_seed(out, seed, s, chosen, from_pretrained=chosen["tspin"])
    r["pretrain_exact_match"] = results["pretrain"]["eval/exact_match"]
    on_cores = core_seconds(results)
    summary = {"settings": s, "seed": seed, "processes": processes, "threads": threads,
               "generation_backend": backend_line, "result": r,
               "seconds": previous["seconds"] if all_done and previous else round(time.time() - t0, 1),
               "cpu_seconds": round(sum(x["cpu_seconds"] for x in results.values()), 1),
               "estimated_seconds_on_2_free_cores": round(makespan(jobs, on_cores, 2), 1)}
    atomic_write_json(out / "summary.json", summary)
    text = table(r)
    atomic_write_text(out / "table.txt", text + "\n")
    m = r["models"]
    no_plot = plot_curves({x: [[m["pi_0"]["test"]] + [m[f"{x}/iter{t}"]["test"] for t in range(s["iterations"])]]
                           for x in METHODS if x != "sft_cont"},
                          {"SFT continued on 100%, same steps": [m["sft_cont"]["test"]],
                           "extra: T-SPIN from SFT-25% (last iteration)": [m[f"pt_tspin/iter{s['iterations'] - 1}"]
                                                                             ["test"]]},
                          out / "curves.png", title=f"tspin demo, seed {seed}")
    print(text)
    print(f"[demo] wrote {out}/summary.json, table.txt{'' if no_plot else ', curves.png'} "
          f"({summary['seconds']:.0f} s wall, {summary['cpu_seconds']:.0f} CPU s; on 2 free cores about "
          f"{summary['estimated_seconds_on_2_free_cores']:.0f} s)")
    if no_plot:
        print(f"[demo] no curves.png: {no_plot}")
    return summary
