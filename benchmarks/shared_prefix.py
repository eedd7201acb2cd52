"""Batch-layout benchmark: one full T-SPIN optimizer step with padded, packed and shared-prefix batches.

A batch is B triplets; each has a prompt of P tokens and three responses of L tokens (distinct first tokens, so
the shared part is exactly the prompt), at r = P/L in {0.5, 1, 2}. Every layout runs the trainer's path
(``CausalLMLogps``: backbone -> last hidden states -> fused T-SPIN log-probs) and an optimizer step (AdamW):

- ``padded``: 3B rows of P+L tokens with an attention mask;
- ``packed``: one row of the 3B sequences back to back (positions restarting per sequence, ``cu_seqlens``);
- ``shared_prefix``: per triplet one sequence [prompt, real, generated, proto], one triplet per row (rows of the
  longest example, the default of ``build_shared_prefix_batch``; one row for all under FlexAttention), the
  layout's mask for the attention used.

Recorded per (r, layout): median step time over rounds that interleave the three layouts (the machine's load
moves all of them alike), the tokens the backbone runs (padding included), and the peak memory (CUDA: peak
allocated during the step; CPU: the peak RSS rise of one step in a fresh process, ``--probe-memory``).
The backbone-token ratio shared/packed is ``(P + 3L) / (3P + 3L) = (r + 3) / (3r + 3)``.

Configs (random init, built from a ``LlamaConfig``): ``cpu`` (D=384, 6 layers, V=4096: the backbone dominates
the step), ``gpu`` (Llama-3.2-1B shape, bf16), ``toy`` (seconds, for CI). CLI (JSON lines):

    python -m benchmarks.shared_prefix --config cpu --rounds 5 [--attn sdpa|eager|flex_attention]
    python -m benchmarks.shared_prefix --config cpu --probe-memory shared_prefix --ratio 1
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from benchmarks import common

LAYOUTS = ("padded", "packed", "shared_prefix")
RATIOS = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class LayoutConfig:
    name: str
    model: dict  # LlamaConfig sizes
    L: int  # response tokens
    B: int  # triplets per step

    @property
    def V(self) -> int:
        return self.model["vocab_size"]


def _llama(D, layers, heads, kv_heads, ffn, V) -> dict:
    return dict(hidden_size=D, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                intermediate_size=ffn, vocab_size=V)


CONFIGS = {
    "cpu": LayoutConfig("cpu", _llama(384, 6, 6, 2, 1024, 4096), 64, 2),
    "gpu": LayoutConfig("gpu", _llama(2048, 16, 32, 8, 8192, 128256), 512, 4),
    "toy": LayoutConfig("toy", _llama(32, 2, 4, 2, 64, 101), 6, 2),
}


def prompt_length(cfg: LayoutConfig, r: float) -> int:
    return max(1, round(r * cfg.L))


def token_ratio(r: float) -> float:
    """Backbone tokens of shared_prefix over packed for uniform lengths: (P + 3L) / (3P + 3L)."""
    return (r + 3) / (3 * r + 3)


def build_model(cfg: LayoutConfig, device, dtype, attn: str = "sdpa", seed: int = 0):
    import transformers

    config = transformers.LlamaConfig(**cfg.model, max_position_embeddings=max(256, 8 * cfg.L),
                                      tie_word_embeddings=False, use_cache=False, attn_implementation=attn)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.train()
    return model


def make_examples(cfg: LayoutConfig, r: float, seed: int = 0) -> list:
    """B triplets of (input_ids, labels) lists: prompt P tokens, three responses of L tokens whose first tokens
    differ (the shared part is the prompt exactly)."""
    g = torch.Generator().manual_seed(seed)
    P = prompt_length(cfg, r)
    examples = []
    for _ in range(cfg.B):
        prompt = torch.randint(3, cfg.V, (P,), generator=g).tolist()
        ex = []
        for j in range(3):
            resp = torch.randint(3, cfg.V, (cfg.L,), generator=g).tolist()
            resp[0] = 3 + j  # distinct first tokens
            ex.append((prompt + resp, [-100] * P + resp))
        examples.append(ex)
    return examples


def make_batch(layout: str, examples, model, device) -> dict:
    """The policy's call arguments for ``layout`` (on ``device``) and the backbone tokens they cost.

    Shared-prefix rows: one example each under a dense mask (attention work grows with the row length squared),
    all examples in one row under FlexAttention (its BlockMask skips the masked blocks)."""
    from tspin_kernels.integrations import build_shared_prefix_batch, pack_padded, shared_prefix_attention_mask

    if layout == "shared_prefix":
        one_row = model.config._attn_implementation == "flex_attention"
        b = build_shared_prefix_batch(examples, max_row_tokens=2**31 if one_row else None).to(device)
        mask = shared_prefix_attention_mask(b, model)
        return dict(args=(b.input_ids, b.positions, mask, b.position_ids), tokens=b.backbone_tokens)
    seqs = [ex[j] for j in range(3) for ex in examples]
    T = max(len(s) for s, _ in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(lab), 1
    if layout == "packed":
        ids, labels, pos, cu = pack_padded(ids, labels, mask)
        return dict(args=(ids.to(device), labels.to(device), None, pos.to(device), cu.to(device)), tokens=ids.numel())
    if layout != "padded":
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return dict(args=(ids.to(device), labels.to(device), mask.to(device)), tokens=ids.numel())


class Runner:
    """One model and optimizer; a T-SPIN step of any layout on it (the same weights for all: a step's update is
    tiny at lr 1e-6, and every layout sees the same sequence of states in an interleaved run)."""

    def __init__(self, cfg: LayoutConfig, device, dtype, attn: str = "sdpa", impl: str = "auto"):
        from tspin_kernels.integrations import CausalLMLogps

        self.cfg, self.device = cfg, torch.device(device)
        self.model = build_model(cfg, self.device, dtype, attn)
        self.policy = CausalLMLogps(self.model, impl=impl, validate=False)  # batches are checked at build time
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=self.device.type == "cuda")

    def batches(self, r: float, seed: int = 0) -> dict:
        examples = make_examples(self.cfg, r, seed)
        return {layout: make_batch(layout, examples, self.model, self.device) for layout in LAYOUTS}

    def loss(self, batch: dict) -> torch.Tensor:
        from tspin_kernels import tspin_loss_from_logps

        real, generated, proto = self.policy(*batch["args"]).chunk(3)
        return tspin_loss_from_logps(real, generated, proto, alpha=1.0, beta=0.1)

    def step(self, batch: dict) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        self.opt.step()
        common.sync(self.device)
        return loss.item()


def interleaved_times(runner: Runner, batches: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Step seconds per layout; each round runs every layout once, in an order rotated round by round."""
    for _ in range(warmup):
        for layout in LAYOUTS:
            runner.step(batches[layout])
    times = {layout: [] for layout in LAYOUTS}
    for i in range(rounds):
        order = LAYOUTS[i % len(LAYOUTS):] + LAYOUTS[: i % len(LAYOUTS)]
        for layout in order:
            t0 = time.perf_counter()
            runner.step(batches[layout])
            times[layout].append(time.perf_counter() - t0)
    return times


def cuda_peak(runner: Runner, batch: dict) -> int | None:
    """Peak CUDA memory during one step (model, optimizer state and activations); None off CUDA."""
    if runner.device.type != "cuda":
        return None
    runner.opt.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(runner.device)
    runner.step(batch)
    return torch.cuda.max_memory_allocated(runner.device)


def probe_memory(config: str, layout: str, r: float, attn: str) -> dict:
    """This process: build, one warm-up step, then the peak RSS rise of one more step (benchmarks.rss_probe)."""
    from benchmarks.rss_probe import current_rss, peak_rss, reset_peak

    cfg = CONFIGS[config]
    runner = Runner(cfg, "cpu", torch.float32, attn)
    batch = runner.batches(r)[layout]
    runner.step(batch)
    runner.opt.zero_grad(set_to_none=True)
    gc.collect()
    base = current_rss()
    ok = reset_peak()
    runner.step(batch)
    peak = peak_rss(ok)
    return {"layout": layout, "r": r, "config": config, "peak_rss_rise_bytes": max(0, peak - base),
            "method": "VmHWM after clear_refs" if ok else "ru_maxrss"}


def rss_rise_in_subprocess(config: str, layout: str, r: float, attn: str = "sdpa") -> dict:
    import os
    import subprocess

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CPU step uses the torch kernels
    cmd = [sys.executable, "-m", "benchmarks.shared_prefix", "--config", config, "--attn", attn,
           "--probe-memory", layout, "--ratio", str(r)]
    out = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(cfg: LayoutConfig, r: float, times: dict, tokens: dict) -> dict[str, dict]:
    med = {k: statistics.median(v) for k, v in times.items()}
    P = prompt_length(cfg, r)
    return {layout: {
        "layout": layout, "r": r, "P": P, "L": cfg.L, "B": cfg.B, "config": cfg.name,
        "step_seconds": med[layout], "step_seconds_all": times[layout], "backbone_tokens": tokens[layout],
        "tokens_vs_packed": tokens[layout] / tokens["packed"], "speedup_vs_packed": med["packed"] / med[layout],
        "speedup_vs_padded": med["padded"] / med[layout], "token_ratio_formula": token_ratio(P / cfg.L),
    } for layout in LAYOUTS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="T-SPIN optimizer step: padded vs packed vs shared-prefix batches")
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    p.add_argument("--ratio", type=float, action="append", help="r = P/L (repeatable; default 0.5, 1, 2)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flex_attention"])
    p.add_argument("--impl", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--probe-memory", choices=LAYOUTS, help="print this layout's peak RSS rise of one step (CPU)")
    a = p.parse_args(argv)
    ratios = a.ratio or list(RATIOS)
    if a.probe_memory:
        print(json.dumps(probe_memory(a.config, a.probe_memory, ratios[0], a.attn)), flush=True)
        return 0
    device = common.bench_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = CONFIGS[a.config]
    runner = Runner(cfg, device, dtype, a.attn, a.impl)
    for r in ratios:
        batches = runner.batches(r)
        times = interleaved_times(runner, batches, a.rounds)
        for res in summarize(cfg, r, times, {k: v["tokens"] for k, v in batches.items()}).values():
            res["peak_mem_bytes"] = cuda_peak(runner, batches[res["layout"]])
            print(json.dumps(dict(res, attn=a.attn, **common.provenance())), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
