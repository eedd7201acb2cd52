"""Held-out evaluation of a policy: exact match of greedy answers, and log-likelihood of the reference answers
against the greedy ones."""

from __future__ import annotations

import re
from pathlib import Path

from .data import IGNORE_INDEX, Tokenization
from .generation import SamplingSettings, generate_samples
from .io import atomic_write_jsonl
from .losses import LogpSettings, scored_logps
from .ranks import on_main


def _normalize(text: str) -> str:
    return " ".join(text.split())


def answer_key(text: str, pattern: str | None = None) -> str | tuple[str, ...]:
    """What exact match compares: the text with whitespace runs collapsed, or, with a regular expression
    `pattern`, the list of its matches (what stands between them is free: a task whose annotators word the same
    answer differently scores the content)."""
    return _normalize(text) if pattern is None else tuple(re.findall(pattern, text))


def evaluate(model, tokenizer, records: list[dict], *, sampling: SamplingSettings, tokenization: Tokenization,
             scoring: LogpSettings, out_path: Path | None = None, weights: str | Path | None = None,
             answer_pattern: str | None = None) -> dict:
    """The ``eval/*`` metrics of the policy on held-out ``records``: the answers ``sampling`` draws (greedy:
    temperature 0) go to ``out_path``; the reference and the greedy answer, tokenized as ``tokenization`` says, are
    scored under ``scoring``; exact match compares their :func:`answer_key` (`answer_pattern`). ``weights``: the
    saved policy ``model`` holds (what backend 'vllm' samples from)."""
    if not records:
        return {}
    samples = generate_samples(model, tokenizer, [r["prompt"] for r in records], desc="evaluate", weights=weights,
                               **sampling.kwargs())
    greedy = [s.text for s in samples]
    rows = [{**r, "generated": s.text, "generated_ids": s.token_ids, "generated_truncated": s.truncated}
            for r, s in zip(records, samples)]
    feats = tokenization.features(rows, tokenizer, ("real", "generated"))
    lp = scored_logps(model, feats, ("real", "generated"), tokenizer.pad_token_id, scoring)
    n_tok = sum(sum(1 for x in f["real"][1] if x != IGNORE_INDEX) for f in feats)
    exact = [answer_key(g, answer_pattern) == answer_key(r["real"], answer_pattern) for g, r in zip(greedy, records)]
    if out_path is not None:
        on_main(atomic_write_jsonl, out_path, [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "real": r["real"],
                                                "greedy": g, "exact": e} for r, g, e in zip(records, greedy, exact)])
    n = len(records)
    return {"eval/exact_match": sum(exact) / n, "eval/logps/real": sum(lp["real"]) / n,
            "eval/logps/greedy": sum(lp["generated"]) / n,
            "eval/margins/real_vs_greedy": sum(a - b for a, b in zip(lp["real"], lp["generated"])) / n,
            "eval/nll_per_token": -sum(lp["real"]) / max(n_tok, 1), "eval/num_prompts": n}
