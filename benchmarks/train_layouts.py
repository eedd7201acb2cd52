"""Full `tspin train` T-SPIN runs on the CPU with each batch layout, timed side by side.

Builds a random-init Llama (D=384, 6 layers: the backbone dominates the step) with the demo's character-level
tokenizer, and a triplet file whose prompts have P tokens and whose three responses have L tokens each (after the
template, BOS and EOS; first characters distinct), r = P/L. Then runs the real console command

    tspin train --config RECIPE --layout=LAYOUT --output_dir=...

once per layout per round, rounds interleaving the layouts in rotated order, and reports per layout the median
wall time of the whole command, the median time of the training loop itself (from the trainer's own metrics:
tokens / tokens_per_s summed over steps) and the speed-ups of shared_prefix over packed and padded as medians of
the paired per-round ratios. The load average is read before and after.

    python -m benchmarks.train_layouts --ratio 1 --rounds 3 --out benchmarks/results/cpu-YYYYMMDD-train-layouts.json

``--out`` appends the run to the file's ``runs`` list (every run measured stays on record).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

LAYOUTS = ("padded", "packed", "shared_prefix")
MODEL = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
             intermediate_size=1024)
TOY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)


def build_run_dir(root: Path, *, L: int, r: float, n: int, batch: int, model: dict, seed: int = 0) -> dict:
    """Model dir, data file and recipe under ``root``; returns their paths and the token counts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tspin.config import Config, save_config
    from tspin.experiments.demo import LETTERS, build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8 * L + 64, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **model)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    # paper template: BOS + "### Instruction: " + prompt + "\n\n### Response: " (markers are single tokens)
    P = max(4, round(r * L))
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice(LETTERS) for _ in range(k))  # noqa: E731 (one token per letter)
    rows = []
    for i in range(n):
        # responses: L - 1 letters + EOS, first letters distinct (the shared part is the prompt exactly)
        real, gen, proto = ("abc"[j] + text(L - 2) for j in range(3))
        rows.append({"prompt_id": str(i), "prompt": text(P - 3), "real": real, "generated": gen, "proto": proto})
    data = root / "triplets.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in rows))
    recipe = root / "recipe.yaml"
    save_config(Config(model_name_or_path=str(root / "model"), data_path=str(data), method="tspin",
                       prompt_template="paper", max_length=P + L, max_prompt_length=P, num_train_epochs=1.0,
                       per_device_train_batch_size=batch, gradient_accumulation_steps=1, learning_rate=1e-5,
                       optimizer="adamw", lr_scheduler="constant", warmup_ratio=0.0, loss_impl="torch",
                       device="cpu", progress=False, logging_steps=1, seed=seed).validate(), recipe)
    return {"recipe": recipe, "P": P, "L": L, "n": n, "batch": batch}


def run_train(recipe: Path, layout: str, out_dir: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(common.ROOT)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "tspin.cli", "train", "--config", str(recipe), f"--layout={layout}",
           f"--output_dir={out_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    steps = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [s for s in steps if s.get("phase") == "train"]
    return {"wall_seconds": wall, "steps": len(steps), "losses": [s["loss"] for s in steps],
            "tokens_per_s": [s["tokens_per_s"] for s in steps]}


def measure(root: Path, setup: dict, rounds: int, threads: int = 1, layouts=LAYOUTS) -> dict:
    runs = {layout: [] for layout in layouts}
    for i in range(rounds):
        k = i % len(layouts)
        for layout in layouts[k:] + layouts[:k]:
            runs[layout].append(run_train(setup["recipe"], layout, root / f"run-{layout}-{i}", threads))
    # sequence tokens of one epoch: n triplets x 3 x (P + L), the same count for every layout
    tokens = setup["n"] * 3 * (setup["P"] + setup["L"])
    out = {}
    for layout, rs in runs.items():
        # the loop's busy time: each logged step's tokens / its tokens_per_s (logging_steps=1, equal-size steps)
        loop = [sum(tokens / len(r["tokens_per_s"]) / t for t in r["tokens_per_s"]) for r in rs]
        walls = [r["wall_seconds"] for r in rs]
        out[layout] = {"wall_seconds": statistics.median(walls), "train_loop_seconds": statistics.median(loop),
                       "wall_seconds_all": walls, "train_loop_seconds_all": loop, "steps": rs[0]["steps"],
                       "first_loss": rs[0]["losses"][0]}
    for base in ("packed", "padded"):
        if base in runs and "shared_prefix" in runs:
            for kind in ("wall_seconds", "train_loop_seconds"):
                pairs = zip(out[base][f"{kind}_all"], out["shared_prefix"][f"{kind}_all"])
                out["shared_prefix"][f"speedup_{kind}_vs_{base}"] = statistics.median(b / s for b, s in pairs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="`tspin train` T-SPIN runs per batch layout, interleaved")
    p.add_argument("--ratio", type=float, default=1.0, help="r = P/L")
    p.add_argument("--L", type=int, default=64, help="response tokens")
    p.add_argument("--n", type=int, default=16, help="triplets in the data file (one epoch)")
    p.add_argument("--batch", type=int, default=2, help="triplets per step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--toy", action="store_true", help="a tiny model (seconds; for tests)")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    a = p.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = build_run_dir(root, L=a.L, r=a.ratio, n=a.n, batch=a.batch, model=TOY if a.toy else MODEL)
        results = measure(root, setup, a.rounds, a.threads)
    P, L = setup["P"], setup["L"]
    record = {"benchmark": "tspin train, T-SPIN, CPU", "command": " ".join(["python -m benchmarks.train_layouts",
                                                                          *(argv or sys.argv[1:])]),
              "r": P / L, "P": P, "L": L, "triplets": a.n, "batch": a.batch, "rounds": a.rounds,
              "threads": a.threads, "model": TOY if a.toy else MODEL,
              "backbone_token_ratio_formula": (P + 3 * L) / (3 * P + 3 * L),
              "layouts": results, "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg()),
              **common.provenance()}
    if a.out:  # one file keeps every run: {"runs": [record, ...]}, this one appended
        a.out.parent.mkdir(parents=True, exist_ok=True)
        runs = json.loads(a.out.read_text())["runs"] if a.out.exists() else []
        a.out.write_text(json.dumps({"runs": runs + [record]}, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
