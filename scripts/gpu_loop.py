"""The whole self-play loop on one GPU, each part once and small, timed per phase; one results JSON and a plot.

Parts (each in a process of its own, so one part's GPU memory, engine or crash never reaches the next):

- ``iterate-hf``: ``tspin iterate`` (T-SPIN) on a random-init Llama of the given shape, sampling with HF generate;
- ``iterate-vllm``: the same run sampling with vLLM on the same GPU (the policy handed over in place, the engine
  asleep while training); checked: the engine holds the trained weights byte for byte (a digest of its embedding
  against the saved policy's), and its greedy answers are compared with HF's on the held-out prompts;
- ``shared-prefix``: one iteration with ``layout: shared_prefix`` (each prompt once through the backbone);
- ``lora``: one iteration training LoRA adapters (rank 16, every block linear layer);
- ``fsdp2``: one iteration under ``torchrun --nproc_per_node 1`` with ``strategy: fsdp2``;
- ``trainer``: a few steps of the Hugging Face Trainer backend (tspin_kernels.integrations.TSPINTrainer) on the rows
  ``iterate-hf`` trained on.

Every part checks its result (losses finite, weights changed, the files a run writes) and records the seconds and
peak GPU memory of each phase of each iteration (``OUT/phases.jsonl`` of the run, tspin.phases). The results JSON
(device, versions, commit, settings) is rewritten after every part, so a run cut short keeps what finished; with
$OUT set (the device tool) the JSON, the plot and the log are copied there after every part.

    python scripts/gpu_loop.py                                   # GPU: every part at the llama-1b shape
    python scripts/gpu_loop.py --parts iterate-hf,iterate-vllm   # some parts
    python scripts/gpu_loop.py --shape toy --device cpu --out /tmp/loop.json   # a dry run on CPU (minutes)
    python scripts/gpu_loop.py --plot benchmarks/results/<file>.json           # the plot again, from a results file

The ``llama-1b`` shape is benchmarks/e2e.py's (Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN
8192, 128256-token vocabulary, tied embeddings), its vocabulary the demo's characters plus filler tokens, its
prompts the demo task's. A random-init model almost never samples EOS, so every sample runs to max_new_tokens: the
workload is fixed by the settings, whatever the weights.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("iterate-hf", "iterate-vllm", "shared-prefix", "lora", "fsdp2", "trainer")
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    # head_dim 32: the smallest vLLM's CPU attention takes
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=512),
}
EMBED = "model.embed_tokens.weight"  # the same name in Hugging Face's model and vLLM's
PART_TIMEOUT_S = 900


def child_env() -> dict:
    """This process's environment with the repository first on the path (wheels carried to a GPU machine are on
    PYTHONPATH too: kept)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


# ----------------------------------------------------------------------------- inputs
def build_inputs(work: Path, shape: str, prompts: int, eval_prompts: int, bf16: bool = False) -> dict:
    """The random-init model (saved in bf16 for a GPU run: what a user's checkpoint holds), its tokenizer, the
    training and held-out prompts. Built once per work folder, on the CPU: this process holds no GPU memory while
    the parts run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tspin.experiments.demo import build_tokenizer, make_task
    from tspin.io import atomic_write_jsonl

    model_dir, train, held = work / "model", work / "train.jsonl", work / "eval.jsonl"
    if not (model_dir / "config.json").exists():
        spec = SHAPES[shape]
        tok = build_tokenizer()
        tok.add_tokens([f"<filler{i}>" for i in range(spec["vocab_size"] - len(tok))])
        torch.manual_seed(0)
        config = LlamaConfig(**spec, max_position_embeddings=2048, tie_word_embeddings=True,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(config)
        if bf16:
            model = model.to(torch.bfloat16)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
    atomic_write_jsonl(train, make_task(prompts, seed=1))
    atomic_write_jsonl(held, make_task(eval_prompts, seed=2))
    return {"model": model_dir, "train": train, "eval": held}


def run_config(part: str, inputs: dict, args, out: Path) -> dict:
    """The config of a part's `tspin iterate` run (every key a `--key=value` of the command line)."""
    cfg = dict(model_name_or_path=str(inputs["model"]), data_path=str(inputs["train"]),
               eval_data_path=str(inputs["eval"]), output_dir=str(out), method="tspin", alpha=1.0, beta=0.1,
               num_iterations=args.iterations, learning_rate=args.learning_rate, optimizer="adamw",
               lr_scheduler="constant", warmup_ratio=0.0, per_device_train_batch_size=args.batch_size,
               num_train_epochs=1, max_new_tokens=args.max_new_tokens, eval_max_new_tokens=args.eval_max_new_tokens,
               max_prompt_length=32, max_length=32 + args.max_new_tokens, generation_batch_size=args.prompts,
               eval_batch_size=args.eval_prompts, prompt_template="paper", device=args.device, seed=0,
               logging_steps=1, progress=False, generation_backend="vllm" if part == "iterate-vllm" else "hf",
               reuse_proto_at_iter0=False)
    if part in ("shared-prefix", "lora", "fsdp2"):  # one iteration on iterate-hf's proto: no sampling to wait for
        proto = args.work / "iterate-hf" / "proto.jsonl"
        cfg.update(num_iterations=1, reuse_proto_at_iter0=True, **({"proto_path": str(proto)} if proto.exists()
                                                                    else {}))
    if part == "shared-prefix":
        cfg.update(layout="shared_prefix")
    if part == "lora":
        cfg.update(lora_rank=16, learning_rate=max(args.learning_rate, 1e-4))
    if part == "fsdp2":
        cfg.update(strategy="fsdp2")
    return cfg


# ----------------------------------------------------------------------------- what a run shows
def read_lines(path: Path) -> list[dict]:
    """A finished run's JSONL file, or nothing where the run did not write it."""
    from tspin.io import read_jsonl

    return read_jsonl(path) if path.exists() else []


def saved_tensor(model_dir: Path, name: str):
    """The tensor `name` of a saved model directory (any of its safetensors files), or None."""
    from safetensors import safe_open

    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            if name in fh.keys():
                return fh.get_tensor(name)
    return None


def sampled_tokens(path: Path, field: str) -> int:
    return sum(len(r.get(f"{field}_ids") or []) for r in read_lines(path))


def run_facts(out: Path, initial: Path, final: Path) -> dict:
    """What every iterate part checks and reports."""
    import torch
    from safetensors import safe_open

    from tspin.phases import phase_table

    train = [r for r in read_lines(out / "metrics.jsonl") if r.get("phase") == "train"]
    losses = [r["loss"] for r in train]
    phases = phase_table(out / "phases.jsonl")
    facts = {"phases": phases, "train_steps": len(train),
             "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
             "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
             "train_tokens_per_s": round(sum(r["tokens_per_s"] for r in train) / len(train), 1) if train else None}
    files = sorted(final.glob("*.safetensors"))
    name = EMBED if not (final / "adapter_config.json").exists() else None
    if name and files:  # full weights: the embedding moved (a tied head gets a gradient on every row)
        before, after = (saved_tensor(d, name).float() for d in (initial, final))
        facts["weights_changed"] = not torch.equal(before, after)
    elif files:  # LoRA: the adapter's B matrices start at zero; trained, some are not
        with safe_open(str(files[0]), "pt") as fh:
            facts["weights_changed"] = any(torch.count_nonzero(fh.get_tensor(k)) > 0 for k in fh.keys()
                                           if "lora_B" in k)
    iters = sorted(k for k in phases if k.startswith("iter"))
    facts["iteration_seconds"] = {k: round(sum(p["seconds"] for p in phases[k].values()), 3) for k in iters}
    gen = sum(sampled_tokens(out / k / "generated.jsonl", "generated") for k in iters)
    sample_s = sum(phases[k].get("sample", {}).get("seconds", 0.0) for k in iters)
    if gen and sample_s:
        facts["sampling_tokens_per_s"] = round(gen / sample_s, 1)
        facts["sampled_tokens"] = gen
    proto = sampled_tokens(out / "proto.jsonl", "proto")
    if proto and "proto" in phases.get("start", {}):
        facts["proto_tokens_per_s"] = round(proto / phases["start"]["proto"]["seconds"], 1)
    return facts


def handoff_checks(out: Path, final: Path, eval_path: Path, args) -> dict:
    """In the process that ran the vLLM run: does the engine hold the trained weights, and do its greedy answers
    (the last evaluation's) equal HF generate's with those weights?"""
    import torch

    from tspin.generation import generate_samples, vllm_engine
    from tspin.generation.vllm_worker import tensor_digest
    from tspin.models import LoadSettings, load_policy, load_tokenizer

    engine = vllm_engine.current_engine()
    facts = {}
    if engine is not None:
        saved = saved_tensor(final, EMBED)
        dtype = torch.bfloat16 if engine.cuda else torch.float32  # what the engine was built with
        facts["engine_holds_trained_weights"] = engine.weight_digest(EMBED, len(saved)) == tensor_digest(
            saved.to(dtype))
    greedy = [r["greedy"] for r in read_lines(final.parent / "eval_generations.jsonl")]
    prompts = [r["prompt"] for r in read_lines(eval_path)]
    tok = load_tokenizer(str(final))
    model = load_policy(LoadSettings(model_name_or_path=str(final), device=args.device))
    hf = [s.text for s in generate_samples(model, tok, prompts, backend="hf", template="paper",
                                           max_prompt_length=32, max_new_tokens=args.eval_max_new_tokens,
                                           temperature=0.0, batch_size=len(prompts), progress=False)]
    same = sum(a == b for a, b in zip(greedy, hf))
    first = sum(a[:1] == b[:1] for a, b in zip(greedy, hf))
    # bf16 kernels differ between the engines; a random-init model's logits are nearly flat, so an argmax can flip
    facts.update(greedy_equal_hf=f"{same}/{len(hf)}", greedy_first_char_equal_hf=f"{first}/{len(hf)}")
    return facts


# ----------------------------------------------------------------------------- the parts (each in its own process)
def run_iterate_part(part: str, args) -> dict:
    from tspin.cli import main as tspin_main

    inputs = build_inputs(args.work, args.shape, args.prompts, args.eval_prompts)
    out = args.work / part
    if out.exists():
        shutil.rmtree(out)
    cfg = run_config(part, inputs, args, out)
    argv = ["iterate"] + [f"--{k}={v}" for k, v in cfg.items()]
    t0 = time.perf_counter()
    if part == "fsdp2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
               "tspin.cli", *argv]
        rc = subprocess.run(cmd, cwd=ROOT, env=child_env()).returncode
    else:
        rc = tspin_main(argv)
    result = {"config": cfg, "exit_code": rc, "wall_seconds": round(time.perf_counter() - t0, 2)}
    if rc != 0:
        return {**result, "status": "failed", "reason": f"tspin iterate exited {rc}"}
    final = out / f"iter{cfg['num_iterations'] - 1}" / "model"
    result.update(run_facts(out, inputs["model"], final))
    if part == "iterate-vllm":
        result.update(handoff_checks(out, final, inputs["eval"], args))
    checks = [result["losses_finite"], result.get("weights_changed", False),
              result.get("engine_holds_trained_weights", True)]
    return {**result, "status": "ok" if all(checks) else "failed"}


def run_trainer_part(args) -> dict:
    """A few optimizer steps of TSPINTrainer (the Hugging Face Trainer backend) on iterate-hf's training rows."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from tspin.models import load_tokenizer
    from tspin_kernels.integrations.tspin_trainer import TSPINConfig, TSPINTrainer

    rows = read_lines(args.work / "iterate-hf" / "iter0" / "data.jsonl")
    if not rows:
        return {"status": "skipped", "reason": "needs iterate-hf's iter0/data.jsonl (run that part first)"}
    inputs = build_inputs(args.work, args.shape, args.prompts, args.eval_prompts)
    tok = load_tokenizer(str(inputs["model"]))
    cuda = args.device != "cpu" and torch.cuda.is_available()
    # fp32 master weights, bf16 autocast (the Trainer's bf16=True): as tspin trains
    model = AutoModelForCausalLM.from_pretrained(str(inputs["model"]), dtype=torch.float32)
    model.to("cuda" if cuda else "cpu")
    before = model.get_input_embeddings().weight.detach().clone()
    cols = ("prompt", "real", "generated", "proto", "generated_ids", "proto_ids", "generated_truncated",
            "proto_truncated")
    ds = Dataset.from_list([{k: r[k] for k in cols if k in r} for r in rows])
    out = args.work / "trainer"
    targs = TSPINConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.trainer_steps,
                        learning_rate=args.learning_rate, lr_scheduler_type="constant", logging_steps=1,
                        save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda, disable_tqdm=True,
                        max_length=32 + args.max_new_tokens, max_prompt_length=32)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = TSPINTrainer(model, args=targs, train_dataset=ds, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    changed = not torch.equal(before, model.get_input_embeddings().weight.detach())
    result = {"steps": args.trainer_steps, "seconds": round(seconds, 3), "losses": losses,
              "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses), "weights_changed": changed,
              "metrics_logged": sorted({k for h in trainer.state.log_history for k in h if k.startswith("rewards/")})}
    if cuda:
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return {**result, "status": "ok" if result["losses_finite"] and changed else "failed"}


def run_part(part: str, args) -> dict:
    if part == "iterate-vllm":
        from tspin.generation import vllm_engine

        if not vllm_engine.available():
            return {"status": "skipped", "reason": "vLLM is not installed in this environment"}
    if part == "trainer":
        return run_trainer_part(args)
    return run_iterate_part(part, args)


# ----------------------------------------------------------------------------- the parent: provenance, JSON, plot
@functools.cache
def gpu_info() -> tuple[str, float]:
    """(name, GiB) of GPU 0, asked in a short-lived process: this one keeps no CUDA context (half a GiB) on the GPU
    while the parts run."""
    code = ("import torch; p = torch.cuda.get_device_properties(0); "
            "print(torch.cuda.get_device_name(0)); print(p.total_memory / 2**30)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split("\n")
    return out[0].strip(), round(float(out[1]), 1)


def provenance(args) -> dict:
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("triton", "vllm", "peft", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    cuda = args.device == "cuda"
    commit = os.environ.get("TSPIN_COMMIT", "").strip()
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            commit = "unknown"
    return {"device": gpu_info()[0] if cuda else "cpu", "gpu_memory_gib": gpu_info()[1] if cuda else None,
            **versions, "commit": commit, "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def comparison(parts: dict) -> dict:
    """The goal: an iteration sampling with vLLM in less than half the time of one sampling with HF generate (the
    last iteration of each: both sample, train, checkpoint and evaluate; the engine's start is in "start")."""
    hf, vl = parts.get("iterate-hf", {}), parts.get("iterate-vllm", {})
    if hf.get("status") != "ok" or vl.get("status") != "ok":
        return {"goal": "vLLM iteration < 0.5x HF's", "met": None, "why": "both iterate parts must have run"}
    last = max(hf["iteration_seconds"])
    ratio = vl["iteration_seconds"][last] / hf["iteration_seconds"][last]
    return {"goal": "vLLM iteration < 0.5x HF's", "iteration": last, "hf_seconds": hf["iteration_seconds"][last],
            "vllm_seconds": vl["iteration_seconds"][last], "ratio": round(ratio, 3), "met": ratio < 0.5}


def plot(results: dict, path: Path) -> Path | None:
    """Stacked bars: where each run's iterations spend their time, phase by phase."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars = []  # (label, {phase: seconds})
    for name, part in results["parts"].items():
        for key, phases in (part.get("phases") or {}).items():
            bars.append((f"{name}\n{key}", {p: v["seconds"] for p, v in phases.items()}))
    if not bars:
        return None
    order = ["proto", "sample", "reference", "train", "checkpoint", "eval"]
    names = order + sorted({p for _, b in bars for p in b} - set(order))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars)), 4.5))
    bottom = [0.0] * len(bars)
    for phase in names:
        vals = [b.get(phase, 0.0) for _, b in bars]
        if any(vals):
            ax.bar(range(len(bars)), vals, bottom=bottom, label=phase)
            bottom = [x + y for x, y in zip(bottom, vals)]
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
    ax.set_ylabel("seconds")
    p = results["provenance"]
    ax.set_title(f"Where an iteration's time goes: {results['settings']['shape']}, {p['device']} ({p['commit']})",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(results: dict, out: Path) -> None:
    """The results file and its plot, and their copies under $OUT (what the device tool brings back; the log is
    written there directly)."""
    from tspin.io import atomic_write_json

    atomic_write_json(out, results)
    png = plot(results, out.with_suffix(".png"))
    if os.environ.get("OUT"):
        for f in (out, png):
            if f is not None and f.exists():
                shutil.copy(f, os.environ["OUT"])


def default_out(device: str) -> Path:
    name = gpu_info()[0] if device == "cuda" else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return ROOT / "benchmarks" / "results" / f"{slug}-loop-{_dt.date.today():%Y%m%d}.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", help="cuda | cpu (a dry run)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--eval-max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8, help="triplets per optimizer step")
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--trainer-steps", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tspin-gpu-loop"), help="the runs' folder (scratch)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/...)")
    ap.add_argument("--plot", type=Path, default=None, metavar="JSON", help="only draw the plot of a results file")
    ap.add_argument("--run-part", default=None, help=argparse.SUPPRESS)  # the child process of one part
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        ap.error(f"--parts: unknown {', '.join(bad) or '(none given)'}; expected some of {', '.join(PARTS)}")
    args.parts = parts
    for name in ("prompts", "eval_prompts", "iterations", "max_new_tokens", "eval_max_new_tokens", "batch_size",
                 "trainer_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.device not in ("cuda", "cpu"):
        ap.error(f"--device: expected cuda or cpu, got {args.device!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        path = plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        print(path or "matplotlib is not installed")
        return 0
    if args.run_part:  # child: one part, its result as JSON on the last line of a file
        result = run_part(args.run_part, args)
        Path(args.work / f"{args.run_part}.result.json").write_text(json.dumps(result, default=str))
        return 0 if result["status"] != "failed" else 1
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA GPU here; use --device cpu --shape toy for a dry run", file=sys.stderr)
            return 2
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out or default_out(args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    # each part's output (its process's), where the device tool brings it back; gpu_suite.sh's own log is beside it
    log = Path(os.environ["OUT"]) / "gpu-loop-parts.log" if os.environ.get("OUT") else None
    results = {"provenance": provenance(args),
               "settings": {k: getattr(args, k) for k in ("shape", "prompts", "eval_prompts", "iterations",
                                                          "max_new_tokens", "eval_max_new_tokens", "batch_size",
                                                          "learning_rate", "trainer_steps", "device")},
               "parts": {}}
    # once, before the parts time anything
    build_inputs(args.work, args.shape, args.prompts, args.eval_prompts, bf16=args.device == "cuda")
    for part in args.parts:
        print(f"[gpu_loop] {part} ...", flush=True)
        child = [sys.executable, str(Path(__file__).resolve()), "--run-part", part, *(argv or sys.argv[1:])]
        result_file = args.work / f"{part}.result.json"
        result_file.unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(child, cwd=ROOT, env=child_env(),
                                  timeout=PART_TIMEOUT_S, capture_output=True, text=True)
            tail = (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as e:
            proc, tail = None, f"timed out after {PART_TIMEOUT_S} s: {str(e.stderr or '')[-2000:]}"
        if result_file.exists():
            result = json.loads(result_file.read_text())
        else:
            result = {"status": "failed", "reason": f"the part's process ended without a result "
                                                    f"(exit {proc.returncode if proc else 'timeout'})"}
        if result["status"] == "failed":
            result["log_tail"] = tail
        result["process_seconds"] = round(time.perf_counter() - t0, 2)
        results["parts"][part] = result
        results["comparison"] = comparison(results["parts"])
        if log is not None:
            with open(log, "a") as f:
                f.write(f"==== {part}\n{tail}\n")
        save(results, out)
        print(f"[gpu_loop] {part}: {result['status']} in {result['process_seconds']} s "
              f"{result.get('reason', '')}", flush=True)
    print(summary_table(results))
    print(f"results: {out}")
    return 0 if all(p["status"] != "failed" for p in results["parts"].values()) else 1


def summary_table(results: dict) -> str:
    lines = [f"{'part':15} {'status':8} {'iteration s':>12} {'sample tok/s':>13} {'train tok/s':>12} "
             f"{'peak GiB':>9}  checks"]
    for name, p in results["parts"].items():
        iters = p.get("iteration_seconds") or {}
        last = iters[max(iters)] if iters else None
        peaks = [v["peak_device_used_gib"] for ph in (p.get("phases") or {}).values() for v in ph.values()
                 if "peak_device_used_gib" in v]
        checks = {k: p[k] for k in ("losses_finite", "weights_changed", "engine_holds_trained_weights",
                                    "greedy_equal_hf") if k in p}
        lines.append(f"{name:15} {p['status']:8} {last if last is not None else '-':>12} "
                     f"{p.get('sampling_tokens_per_s', '-'):>13} {p.get('train_tokens_per_s', '-'):>12} "
                     f"{max(peaks) if peaks else '-':>9}  {checks or p.get('reason', '')}")
    c = results.get("comparison", {})
    if c.get("met") is not None:
        lines.append(f"vLLM iteration / HF iteration = {c['ratio']} (goal < 0.5: {'met' if c['met'] else 'not met'})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
