"""Held-out evaluation of a policy: exact match of greedy answers, and log-likelihood of the reference answers
against the greedy ones."""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .data import IGNORE_INDEX, build_features
from .generation import backend_kwargs, generate_samples
from .io import atomic_write_jsonl
from .losses import autocast, batched_logps
from .ranks import on_main


def _normalize(text: str) -> str:
    return " ".join(text.split())


def evaluate(model, tokenizer, records: list[dict], cfg: Config, out_path: Path | None = None, *,
             weights: str | Path | None = None) -> dict:
    """The ``eval/*`` metrics of the policy on held-out ``records``; the greedy answers go to ``out_path``.
    ``weights``: the saved policy ``model`` holds (what generation_backend 'vllm' samples the answers from)."""
    if not records:
        return {}
    device = next(model.parameters()).device
    samples = generate_samples(model, tokenizer, [r["prompt"] for r in records], template=cfg.prompt_template,
                               max_prompt_length=cfg.max_prompt_length,
                               max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, temperature=0.0,
                               batch_size=cfg.eval_batch_size, progress=cfg.progress, desc="evaluate",
                               **backend_kwargs(cfg, weights))
    greedy = [s.text for s in samples]
    rows = [{**r, "generated": s.text, "generated_ids": s.token_ids, "generated_truncated": s.truncated}
            for r, s in zip(records, samples)]
    feats = build_features(rows, tokenizer, ("real", "generated"), template=cfg.prompt_template,
                           max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                           truncated_samples=cfg.truncated_samples)
    with autocast(device, cfg.bf16):
        lp = batched_logps(model, feats, ("real", "generated"), tokenizer.pad_token_id, batch_size=cfg.eval_batch_size,
                           impl=cfg.loss_impl, layout=cfg.layout)
    n_tok = sum(sum(1 for x in f["real"][1] if x != IGNORE_INDEX) for f in feats)
    exact = [_normalize(g) == _normalize(r["real"]) for g, r in zip(greedy, records)]
    if out_path is not None:
        on_main(atomic_write_jsonl, out_path, [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "real": r["real"],
                                                "greedy": g, "exact": e} for r, g, e in zip(records, greedy, exact)])
    n = len(records)
    return {"eval/exact_match": sum(exact) / n, "eval/logps/real": sum(lp["real"]) / n,
            "eval/logps/greedy": sum(lp["generated"]) / n,
            "eval/margins/real_vs_greedy": sum(a - b for a, b in zip(lp["real"], lp["generated"])) / n,
            "eval/nll_per_token": -sum(lp["real"]) / max(n_tok, 1), "eval/num_prompts": n}
