"""Batched, seeded, resumable generation with Hugging Face `generate` (KV cache, left padding).

Each finished batch is appended to `<out>.partial` (flushed and fsynced); a restarted run keeps those and goes on
from the next batch. Every batch seeds its own sampling from (seed, batch index), so a resumed run writes exactly
what an uninterrupted one would. The final file appears in one rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import encode_prompts
from .io import atomic_write_jsonl
from .ranks import on_main, world


def _read_partial(path: Path) -> list[dict]:
    done = []
    if not path.exists():
        return done
    with open(path) as f:
        for line in f:
            try:
                done.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: everything after it is redone
                break
    return done


def generate_texts(model, tokenizer, prompts: list[str], *, seed: int = 0, partial_path: str | Path | None = None,
                   progress: bool = True, **kwargs) -> list[str]:
    """Responses to `prompts` (raw instructions; the template is applied here), in input order; kwargs as
    `_generate_local`. `model`: an HF model or the training policy (CausalLMLogps, DDP, FSDP2).

    Under torchrun every rank must call this: each samples its share of the prompts (its own seed stream) and all
    get the full list. The partial file (resume inside a generation) is single-process only: ranks would share it.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # DDP has no generate; its module has
        model = model.module
    rank, world_size = world()
    if world_size == 1:
        return _generate_local(model, tokenizer, prompts, seed=seed, partial_path=partial_path, progress=progress,
                               **kwargs)
    from .distributed import sharded_generate

    return sharded_generate(prompts, lambda ps: _generate_local(model, tokenizer, ps, seed=seed + 7919 * rank,
                                                                progress=progress and rank == 0, **kwargs))


@torch.no_grad()
def _generate_local(model, tokenizer, prompts: list[str], *, template: str, max_prompt_length: int,
                   max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   batch_size: int = 16,
                   seed: int = 0, partial_path: str | Path | None = None, progress: bool = True,
                   desc: str = "generate") -> list[str]:
    """This process's responses to `prompts`, in input order."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = encode_prompts(tokenizer, prompts, template, max_prompt_length)
    # longest first: batches of similar length waste less padding; the order is fixed, so resume stays exact
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    partial = Path(partial_path) if partial_path else None
    done = _read_partial(partial) if partial else []
    # keep only the prefix made with this very batching (a changed batch size or data starts over)
    n_done_batches = 0
    while n_done_batches < min(len(done), len(batches)) and done[n_done_batches]["index"] == batches[n_done_batches]:
        n_done_batches += 1
    done = done[:n_done_batches]
    if partial:
        partial.parent.mkdir(parents=True, exist_ok=True)
        # rewrite what survived (drops a torn last line), then append batch by batch
        with open(partial, "w") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in done)
    results: dict[int, str] = {i: t for d in done for i, t in zip(d["index"], d["text"])}
    was_training = model.training
    model.eval()
    sample = temperature > 0
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=pad,
                      eos_token_id=tokenizer.eos_token_id, use_cache=True)
    if sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:  # greedy: silence the model's default sampling settings
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    bar = tqdm(total=len(prompts), initial=sum(len(b) for b in batches[:n_done_batches]), desc=desc,
               disable=not progress, leave=False)
    for b, idx in enumerate(batches):
        if b < n_done_batches:
            continue
        T = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            input_ids[r, T - len(ids[i]):] = torch.tensor(ids[i])
            mask[r, T - len(ids[i]):] = 1
        torch.manual_seed(seed * 1_000_003 + b)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
        texts = tokenizer.batch_decode(out[:, T:], skip_special_tokens=True)
        for i, t in zip(idx, texts):
            results[i] = t
        if partial:
            with open(partial, "a") as f:
                f.write(json.dumps({"batch": b, "index": idx, "text": texts}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return [results[i] for i in range(len(prompts))]


def generate_field(model, tokenizer, records: list[dict], out_path: str | Path, field: str, cfg, *, seed: int,
                   desc: str | None = None) -> list[dict]:
    """Write `records` + `field` (sampled responses) to `out_path` (JSONL, atomic, resumable); cached if it exists."""
    out_path = Path(out_path)
    if out_path.exists():
        from .data import load_records

        return load_records(out_path, require_response=False)
    partial = out_path.with_name(out_path.name + ".partial")
    texts = generate_texts(model, tokenizer, [r["prompt"] for r in records], template=cfg.prompt_template,
                           max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                           batch_size=cfg.generation_batch_size,
                           seed=seed, partial_path=partial, progress=cfg.progress, desc=desc or f"generate {field}")
    rows = [{**r, field: t} for r, t in zip(records, texts)]
    on_main(_finish, out_path, rows, partial)
    return rows


def _finish(out_path: Path, rows: list[dict], partial: Path) -> None:
    atomic_write_jsonl(out_path, rows)
    partial.unlink(missing_ok=True)
