"""Full `tspin train` T-SPIN runs with each batch layout, at two length mixes, timed side by side in one run.

Builds a random-init Llama (by default width 256, 6 layers: the shape of issue 28's measurement) with the demo's
character-level tokenizer, and per length mix a triplet file (after the template, BOS and EOS):

- ``equal``: every prompt ``P = r * L`` tokens, every response ``L`` tokens;
- ``vary``: prompt and response lengths drawn uniformly from ``[0.4, 1.6]`` times those (a 4x spread, the same
  means).

Then runs the real console command ``tspin train --config RECIPE --layout=LAYOUT --output_dir=...`` once per
(mix, layout) per round (``--layouts packed:sdpa,...`` adds ``--attn_implementation=sdpa``), rounds interleaving
them in rotated order, with one torch thread. Per (mix, layout): the
whole command's wall time and CPU seconds (the child process's), the training loop's time (from the trainer's
own metrics: tokens / tokens_per_s over steps), min and median over rounds, the attention implementation the run
recorded, and per mix the speed-ups over padded as medians of the paired per-round ratios. The issue's goals are
checked on them. The load average is read before and after.

    python -m benchmarks.train_layouts --rounds 3 --out benchmarks/results/cpu-YYYYMMDD-train-layouts.json
    python -m benchmarks.train_layouts --model 1b --device cuda --n 64 --L 512 --rounds 3 --out ...  (a GPU)

``--out`` appends the run to the file's ``runs`` list (every run measured stays on record).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

LAYOUTS = ("padded", "packed", "shared_prefix")
MIXES = ("equal", "vary")
MODELS = {
    "cpu": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=688),
    # the Llama-3.2-1B body (the vocabulary stays the demo tokenizer's: the head is not what is measured)
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192),
}
TOY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
SPREAD = (0.4, 1.6)  # the vary mix: lengths from 0.4x to 1.6x their mean, a 4x range
# issue 28's goals: packed / padded speed-up at least 1.15 when lengths vary, at least 1/1.05 when they are equal;
# shared_prefix / padded at least 1.3 at P = L
GOALS = {("vary", "packed"): 1.15, ("equal", "packed"): 1 / 1.05, ("equal", "shared_prefix"): 1.3}


def build_run_dir(root: Path, *, L: int, r: float, n: int, batch: int, model: dict, seed: int = 0,
                  mix: str = "equal", device: str = "cpu") -> dict:
    """Model dir (shared by the mixes), data file and recipe under ``root``; returns their paths and token counts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tspin.config import Config, save_config
    from tspin.experiments.demo import LETTERS, build_tokenizer

    if mix not in MIXES:
        raise ValueError(f"mix: expected one of {MIXES}, got {mix!r}")
    P = max(4, round(r * L))
    lo, hi = SPREAD if mix == "vary" else (1.0, 1.0)
    longest_p, longest_l = max(4, round(hi * P)), max(3, round(hi * L))
    model_dir = root / "model"
    if not model_dir.exists():
        tok = build_tokenizer()
        cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8 * (P + L) + 64, tie_word_embeddings=False,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          **model)
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    # paper template: BOS + "### Instruction: " + prompt + "\n\n### Response: " (markers are single tokens)
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice(LETTERS) for _ in range(k))  # noqa: E731 (one token per letter)
    length = lambda mean, least: max(least, round(rng.uniform(lo, hi) * mean))  # noqa: E731
    rows, tokens = [], 0
    for i in range(n):
        p = length(P, 4)
        # responses: l - 1 letters + EOS, first letters distinct (the shared part is the prompt exactly)
        lengths = [length(L, 3) for _ in range(3)]
        real, gen, proto = ("abc"[j] + text(lengths[j] - 2) for j in range(3))
        rows.append({"prompt_id": str(i), "prompt": text(p - 3), "real": real, "generated": gen, "proto": proto})
        tokens += 3 * p + sum(lengths)
    data = root / f"triplets-{mix}.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in rows))
    recipe = root / f"recipe-{mix}.yaml"
    save_config(Config(model_name_or_path=str(model_dir), data_path=str(data), method="tspin",
                       prompt_template="paper", max_length=longest_p + longest_l, max_prompt_length=longest_p,
                       num_train_epochs=1.0, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                       learning_rate=1e-5, optimizer="adamw", lr_scheduler="constant", warmup_ratio=0.0,
                       loss_impl="torch" if device == "cpu" else "auto", device=device, progress=False,
                       logging_steps=1, seed=seed).validate(), recipe)
    return {"recipe": recipe, "P": P, "L": L, "n": n, "batch": batch, "mix": mix, "tokens": tokens}


def run_train(recipe: Path, layout: str, out_dir: Path, threads: int) -> dict:
    """One ``tspin train``; ``layout`` is a layout, or ``layout:attn`` to run it with another attention."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(common.ROOT)}
    env.pop("TRITON_INTERPRET", None)
    layout, _, attn = layout.partition(":")
    cmd = [sys.executable, "-m", "tspin.cli", "train", "--config", str(recipe), f"--layout={layout}",
           f"--output_dir={out_dir}", *([f"--attn_implementation={attn}"] if attn else [])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    steps = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [s for s in steps if s.get("phase") == "train"]
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_seconds": wall, "cpu_seconds": cpu, "steps": len(steps), "losses": [s["loss"] for s in steps],
            "tokens_per_s": [s["tokens_per_s"] for s in steps], "attn_implementation": steps[0].get(
                "attn_implementation")}


def _summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "all": values}


def measure(root: Path, setups: dict[str, dict], rounds: int, threads: int = 1, layouts=LAYOUTS) -> dict:
    """``setups``: per mix, :func:`build_run_dir`'s result. Returns per mix, per layout the timings."""
    combos = [(mix, layout) for mix in setups for layout in layouts]
    runs = {c: [] for c in combos}
    for i in range(rounds):
        k = i % len(combos)
        for mix, layout in combos[k:] + combos[:k]:
            print(f"round {i + 1}/{rounds}: {mix} {layout} (load {os.getloadavg()[0]:.2f})", file=sys.stderr,
                  flush=True)
            runs[mix, layout].append(run_train(setups[mix]["recipe"], layout,
                                               root / f"run-{mix}-{layout.replace(':', '-')}-{i}", threads))
    out: dict = {mix: {} for mix in setups}
    for (mix, layout), rs in runs.items():
        tokens = setups[mix]["tokens"]  # sequence tokens of one epoch, the same for every layout
        # the loop's busy time: each logged step's tokens / its tokens_per_s (logging_steps=1)
        loop = [sum(tokens / len(r["tokens_per_s"]) / t for t in r["tokens_per_s"]) for r in rs]
        out[mix][layout] = {"wall_seconds": _summary([r["wall_seconds"] for r in rs]),
                            "cpu_seconds": _summary([r["cpu_seconds"] for r in rs]),
                            "train_loop_seconds": _summary(loop), "steps": rs[0]["steps"],
                            "first_loss": rs[0]["losses"][0], "attn_implementation": rs[0]["attn_implementation"]}
    for per in out.values():
        for layout, res in per.items():
            if layout == "padded" or "padded" not in per:
                continue
            for kind in ("wall_seconds", "cpu_seconds", "train_loop_seconds"):
                pairs = zip(per["padded"][kind]["all"], res[kind]["all"])
                res[f"speedup_vs_padded_{kind}"] = statistics.median(b / s for b, s in pairs)
    return out


def goals(results: dict) -> dict:
    """Each goal of issue 28 on the whole command's wall time and CPU seconds (paired medians)."""
    out = {}
    for (mix, layout), bound in GOALS.items():
        res = results.get(mix, {}).get(layout)
        if res is None or "speedup_vs_padded_wall_seconds" not in res:
            continue
        got = {k: res[f"speedup_vs_padded_{k}"] for k in ("wall_seconds", "cpu_seconds")}
        out[f"{mix}/{layout}"] = {"speedup_vs_padded_at_least": bound, **got,
                                  "met": all(v >= bound for v in got.values())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="`tspin train` T-SPIN runs per batch layout and length mix, interleaved")
    p.add_argument("--ratio", type=float, default=1.0, help="r = P/L (mean prompt over mean response length)")
    p.add_argument("--L", type=int, default=128, help="mean response tokens")
    p.add_argument("--n", type=int, default=72, help="triplets in the data file (one epoch)")
    p.add_argument("--batch", type=int, default=8, help="triplets per step")
    p.add_argument("--mixes", default=",".join(MIXES), help="comma-separated: equal, vary")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="comma-separated layouts, each optionally layout:attn_implementation (packed:sdpa)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=sorted(MODELS), default="cpu")
    p.add_argument("--device", default="cpu", help="the recipes' device (cpu, cuda)")
    p.add_argument("--toy", action="store_true", help="a tiny model (seconds; for tests)")
    p.add_argument("--out", type=Path, help="append the results to this JSON file")
    a = p.parse_args(argv)
    mixes = [m.strip() for m in a.mixes.split(",") if m.strip()]
    layouts = tuple(x.strip() for x in a.layouts.split(",") if x.strip())
    model = TOY if a.toy else MODELS[a.model]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setups = {mix: build_run_dir(root, L=a.L, r=a.ratio, n=a.n, batch=a.batch, model=model, mix=mix,
                                     device=a.device) for mix in mixes}
        results = measure(root, setups, a.rounds, a.threads, layouts)
    record = {"benchmark": f"tspin train, T-SPIN, {a.device}", "command": " ".join(
                  ["python -m benchmarks.train_layouts", *(argv if argv is not None else sys.argv[1:])]),
              "r": a.ratio, "L": a.L, "length_spread_vary": SPREAD, "triplets": a.n, "batch": a.batch,
              "rounds": a.rounds, "threads": a.threads, "model": model,
              "tokens_per_epoch": {m: s["tokens"] for m, s in setups.items()}, "results": results,
              "goals": goals(results), "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg()),
              "cpu_count": os.cpu_count(), **common.provenance()}
    if a.out:  # one file keeps every run: {"runs": [record, ...]}, this one appended
        a.out.parent.mkdir(parents=True, exist_ok=True)
        runs = json.loads(a.out.read_text())["runs"] if a.out.exists() else []
        tmp_out = a.out.with_suffix(a.out.suffix + ".tmp")
        tmp_out.write_text(json.dumps({"runs": runs + [record]}, indent=1) + "\n")
        tmp_out.replace(a.out)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
