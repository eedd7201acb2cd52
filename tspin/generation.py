"""Batched, seeded, resumable generation with Hugging Face `generate` (KV cache, left padding), shared out over
the ranks under torchrun.

Each finished batch is appended to `<out>.partial` (flushed and fsynced); a restarted run keeps those and goes on
from the next batch. Every batch seeds its own sampling from (seed, batch index), so a resumed run writes exactly
what an uninterrupted one would. The final file appears in one rename.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .data import encode_prompts
from .io import append_jsonl, atomic_write_jsonl
from .ranks import on_main, world
from .wrapping import policy_of


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
    `_generate_local`. `model`: the training policy (tspin.wrapping.wrap_model: one process, DDP, FSDP2).

    Under torchrun every rank must call this: each samples its share of the prompts (its own seed stream) and all
    get the full list. The partial file (resume inside a generation) is single-process only: ranks would share it.
    """
    policy = policy_of(model)  # DDP has no generate; under FSDP2 the policy's generate gathers the root's weights
    rank, world_size = world()
    if world_size == 1:
        return _generate_local(policy, tokenizer, prompts, seed=seed, partial_path=partial_path, progress=progress,
                               **kwargs)
    return sharded_generate(prompts, lambda ps: _generate_local(policy, tokenizer, ps, seed=seed + 7919 * rank,
                                                                progress=progress and rank == 0, **kwargs))


def sharded_generate(items: Sequence, generate_fn: Callable[[list], Sequence]) -> list:
    """Run ``generate_fn`` on this rank's share of ``items`` and return every rank's results in ``items`` order.

    Item i goes to rank ``i % world_size``. Every rank gets the same number of items (the short ones repeat their
    last item, and the repeats' results are dropped) because under FSDP2 each forward is a collective: ranks must
    make the same number of ``generate`` calls. ``generate_fn(list_of_items) -> list_of_results`` (same length)
    must be called on every rank; results must be picklable. Returns the full list on every rank.
    """
    if not callable(generate_fn):
        raise TypeError(f"generate_fn: expected a callable taking a list of items, got {type(generate_fn).__name__}")
    items = list(items)
    if not items:  # the same list on every rank: all return here, no collective is left waiting
        return []
    rank, world_size = world()
    mine = list(range(rank, len(items), world_size))
    per_rank = math.ceil(len(items) / world_size)
    local = [items[i] for i in mine] + [items[mine[-1] if mine else 0]] * (per_rank - len(mine))
    out = list(generate_fn(local))
    if len(out) != len(local):
        raise ValueError(f"generate_fn: returned {len(out)} results for {len(local)} items on rank {rank}")
    if world_size == 1:
        return out
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, out[: len(mine)])
    result: list = [None] * len(items)
    for r, outs in enumerate(gathered):
        for j, value in enumerate(outs):
            result[r + j * world_size] = value
    return result


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
            append_jsonl(partial, {"batch": b, "index": idx, "text": texts})
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
