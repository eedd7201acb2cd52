"""Sampling throughput of the two generation backends, HF generate vs vLLM, through `tspin.generation.generate_samples`
(what the self-play loop runs: same prompts, same template, temperature 1, EOS stops), on random-init Llamas:

- ``demo``: the demo's model (hidden 128, 4 layers, 4 heads, tied embeddings, the demo's character tokenizer and
  task prompts, max_new_tokens 10, the demo's 256 prompts per HF batch);
- ``llama-100m``: a ~110M-parameter Llama (hidden 768, 12 layers, 12 heads, 32000-token vocabulary: the demo's
  characters plus filler tokens), max_new_tokens 64, 64 prompts per HF batch.

Tokens are the generated ones (EOS included), counted per sample; seconds are the generation call's wall time,
the vLLM engine's start measured apart (it is paid once per process and kept between calls). Both backends get the
same threads (`--threads`; vLLM's CPU engine is pinned to cores 0..threads-1). One run, written to
``benchmarks/results/<device>-generation-<yyyymmdd>.json`` with its provenance (command, commit, versions, CPU).

    .venv-vllm/bin/python -m benchmarks.generation [--threads 1] [--out PATH]     # = make bench-generation
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from tspin.io import atomic_write_text

MODELS = {
    # the demo's tokenizer in the demo's model as it was when the committed results were measured (width 128, 4
    # layers: 1.1M parameters; the chained-operations demo now uses width 96, 3 layers)
    "demo": dict(model=None, shape=dict(hidden=128, layers=4, heads=4), prompts=512, max_new_tokens=10,
                 hf_batch_size=256),
    "llama-100m": dict(model=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                  num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
                       prompts=256, max_new_tokens=64, hf_batch_size=64),
}


def build(name: str, path: Path) -> int:
    """Save the random-init model `name` and its tokenizer to `path`; its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tspin.experiments.demo import build_model, build_tokenizer

    spec = MODELS[name]["model"]
    tok = build_tokenizer()
    if spec:  # the demo's characters and markers, then filler tokens up to the model's vocabulary
        tok.add_tokens([f"<filler{i}>" for i in range(spec["vocab_size"] - len(tok))])
        assert len(tok) == spec["vocab_size"], (len(tok), spec["vocab_size"])
    if spec is None:
        model = build_model(tok, **MODELS[name]["shape"], seed=0)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**spec, max_position_embeddings=512, tie_word_embeddings=True,
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def measure(name: str, path: Path, backend: str, threads: int) -> dict:
    from tspin.experiments.demo import make_task
    from tspin.generation import generate_samples
    from tspin.models import LoadSettings, load_policy, load_tokenizer

    spec = MODELS[name]
    prompts = [r["prompt"] for r in make_task(spec["prompts"], seed=2)]
    tok = load_tokenizer(str(path))
    opts = dict(template="paper", max_prompt_length=24, max_new_tokens=spec["max_new_tokens"], temperature=1.0,
                seed=0, progress=False)
    torch.set_num_threads(threads)
    start = 0.0
    if backend == "hf":
        model = load_policy(LoadSettings(str(path), device="cpu"))  # the trainer's policy
        run = lambda: generate_samples(model, tok, prompts, backend="hf", batch_size=spec["hf_batch_size"], **opts)
    else:
        t0 = time.perf_counter()  # the engine starts on the first call; a 2-prompt call pays for it
        generate_samples(None, tok, prompts[:2], backend="vllm", weights=path, **opts)
        start = time.perf_counter() - t0
        run = lambda: generate_samples(None, tok, prompts, backend="vllm", weights=path, **opts)
    t0 = time.perf_counter()
    samples = run()
    seconds = time.perf_counter() - t0
    tokens = sum(s.num_tokens for s in samples)
    return {"model": name, "backend": backend, "prompts": len(prompts), "max_new_tokens": spec["max_new_tokens"],
            "hf_batch_size": spec["hf_batch_size"] if backend == "hf" else None, "tokens": tokens,
            "truncated": sum(s.truncated for s in samples), "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "engine_start_s": round(start, 1) if start else None}


def provenance(threads: int) -> dict:
    from importlib import metadata

    from tspin.generation import vllm_engine

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    dirty = common._git("status", "--porcelain", "--untracked-files=no", "--", "tspin", "benchmarks")
    head = common._git("rev-parse", "--short=12", "HEAD") or "unknown"
    return {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.generation", *sys.argv[1:]]),
            "commit": head + ("+dirty" if dirty else ""), "cpu": cpu, "cpu_count": os.cpu_count(),
            "avx512": "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
            "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": metadata.version("transformers"), "vllm": vllm_engine.version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="threads for each backend (default 1)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--out", help="results JSON (default benchmarks/results/<device>-generation-<date>.json)")
    args = p.parse_args(argv)
    from tspin.generation import vllm_engine

    if not vllm_engine.available():
        p.error("vLLM is not installed here: run it in .venv-vllm (make bench-generation)")
    # vLLM's CPU engine takes every core but one unless told; give it the HF backend's threads
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if args.threads == 1 else f"0-{args.threads - 1}"
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    results, params = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = Path(tmp) / name
            params[name] = build(name, path)
            for backend in ("hf", "vllm"):
                r = {**measure(name, path, backend, args.threads), "parameters": params[name]}
                print(json.dumps(r), flush=True)
                results.append(r)
            vllm_engine.close_engine()
    by = {(r["model"], r["backend"]): r for r in results}
    ratios = {n: round(by[n, "vllm"]["tokens_per_s"] / by[n, "hf"]["tokens_per_s"], 2) for n in names}
    doc = {"benchmark": "generation", "provenance": provenance(args.threads), "results": results,
           "vllm_over_hf": ratios}
    out = Path(args.out) if args.out else (common.RESULTS_DIR / f"cpu-generation-{_dt.date.today():%Y%m%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(doc, indent=2) + "\n")
    print("| model | parameters | backend | prompts x max new tokens | tokens | seconds | tokens/s | vLLM / HF |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"**{ratios[r['model']]}x**" if r["backend"] == "vllm" else ""
        print(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['backend']} | {r['prompts']} x "
              f"{r['max_new_tokens']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {ratio} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
