"""Batched, seeded, resumable generation, shared out over the ranks under torchrun: Hugging Face `generate` (KV
cache, left padding; here) or vLLM (`generation_backend: vllm`, :mod:`tspin.generation_vllm`).

Each finished batch is appended to `<out>.partial` (flushed and fsynced); a restarted run keeps those and goes on
from the next batch. Every batch seeds its own sampling from (seed, batch index), so a resumed run writes exactly
what an uninterrupted one would. The final file appears in one rename.

A sample keeps its token ids (trained on as they are: re-tokenizing the text can give other ids) and whether it
was cut at max_new_tokens. Sampling stops at any of the model's stop tokens (:func:`tspin.data.stop_token_ids`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .data import encode_prompts, stop_token_ids
from .io import append_jsonl, atomic_write_jsonl
from .ranks import on_main, world
from .wrapping import policy_of

BACKENDS = ("hf", "vllm")  # = tspin.config.GENERATION_BACKENDS


@dataclass(frozen=True)
class Sample:
    """One response: its text (special tokens and the stop token dropped), whether it was cut at max_new_tokens
    instead of ending with a stop token, and the sampled token ids (the stop token included when it stopped)."""

    text: str
    truncated: bool
    token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def sample_of(ids: list[int], stops: Sequence[int], tokenizer) -> Sample:
    """One generated row (anything after its first stop token, e.g. padding, dropped) as a Sample."""
    end = next((k for k, t in enumerate(ids) if t in stops), None)
    ids = list(ids) if end is None else list(ids[: end + 1])
    return Sample(tokenizer.decode(ids if end is None else ids[:-1], skip_special_tokens=True), end is None, ids)


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


def generate_texts(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """Responses to `prompts` (raw instructions; the template is applied here), in input order; kwargs as
    `generate_samples`."""
    return [s.text for s in generate_samples(model, tokenizer, prompts, **kwargs)]


def generate_samples(model, tokenizer, prompts: list[str], *, seed: int = 0, partial_path: str | Path | None = None,
                     progress: bool = True, backend: str = "hf", weights: str | Path | None = None,
                     engine: dict | None = None, **kwargs) -> list[Sample]:
    """Samples for `prompts`, in input order; kwargs as `_generate_local`. Backend 'hf' samples with `model`, the
    training policy (tspin.wrapping.wrap_model: one process, DDP, FSDP2); backend 'vllm' samples from the saved
    policy in `weights` (a save_pretrained or LoRA-adapter directory; `engine`: tspin.vllm_engine.EngineOptions
    fields) and ignores `model`.

    Under torchrun every rank must call this: each samples its share of the prompts and all get the full list. The
    partial file (resume inside a generation) is single-process only: ranks would share it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        from .generation_vllm import generate_samples as vllm_samples

        return vllm_samples(weights, tokenizer, prompts, seed=seed, partial_path=partial_path, progress=progress,
                            engine=engine, **kwargs)
    policy = policy_of(model)  # DDP has no generate; under FSDP2 the policy's generate gathers the root's weights
    rank, world_size = world()
    if world_size == 1:
        return _generate_local(policy, tokenizer, prompts, seed=seed, partial_path=partial_path, progress=progress,
                               **kwargs)
    return sharded_generate(prompts, lambda ps: _generate_local(policy, tokenizer, ps, seed=seed + 7919 * rank,
                                                                progress=progress and rank == 0, **kwargs))


def resume_partial(partial: Path | None, chunks: list[list[int]]) -> list[dict]:
    """The lines of `partial` made with this very chunking (a changed batch size or data starts over; so does a
    file without the truncation flags), rewritten in place (a line torn by a kill is dropped), ready for
    `append_partial`."""
    done = _read_partial(partial) if partial else []
    n = 0
    while (n < min(len(done), len(chunks)) and done[n].get("index") == chunks[n]
           and {"text", "truncated", "ids"} <= set(done[n])):
        n += 1
    done = done[:n]
    if partial:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in done)
    return done


def append_partial(partial: Path | None, chunk: int, index: list[int], samples: list[Sample]) -> None:
    """One finished chunk, flushed and fsynced: a kill never loses it."""
    if partial:
        append_jsonl(partial, {"batch": chunk, "index": index, "text": [s.text for s in samples],
                               "truncated": [s.truncated for s in samples],
                               "ids": [s.token_ids for s in samples]})


def samples_of(line: dict) -> list[Sample]:
    """The samples of one partial-file line."""
    return [Sample(*x) for x in zip(line["text"], line["truncated"], line["ids"])]


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
                   desc: str = "generate") -> list[Sample]:
    """This process's samples for `prompts`, in input order."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = encode_prompts(tokenizer, prompts, template, max_prompt_length)
    # longest first: batches of similar length waste less padding; the order is fixed, so resume stays exact
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    partial = Path(partial_path) if partial_path else None
    done = resume_partial(partial, batches)
    n_done_batches = len(done)
    results: dict[int, Sample] = {i: s for d in done for i, s in zip(d["index"], samples_of(d))}
    was_training = model.training
    model.eval()
    sample = temperature > 0
    hf_model = getattr(model, "model", model)  # the policy (CausalLMLogps) holds the HF model (PEFT or not)
    stops = stop_token_ids(tokenizer, template, getattr(hf_model, "generation_config", None))
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=pad, eos_token_id=stops,
                      use_cache=True)
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
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **gen_kwargs)[:, T:]
        # a row without a stop token ran to max_new_tokens (generation stops early once every row has one)
        samples = [sample_of(row, stops, tokenizer) for row in out.tolist()]
        results.update(zip(idx, samples))
        append_partial(partial, b, idx, samples)
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return [results[i] for i in range(len(prompts))]


def backend_kwargs(cfg, weights: str | Path | None) -> dict:
    """generate_samples' backend keywords for a run's config; `weights`: the saved policy the in-memory one was
    loaded from or saved to (what backend 'vllm' samples from)."""
    return dict(backend=cfg.generation_backend, weights=weights, engine=engine_options(cfg))


def engine_options(cfg) -> dict:
    """tspin.vllm_engine.EngineOptions fields from a run's config."""
    return dict(base_model=cfg.model_name_or_path, lora_rank=cfg.lora_rank, bf16=cfg.bf16, device=cfg.device,
                gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)


def check_backend(cfg) -> None:
    """Before a command loads anything: the configured backend can sample the run's initial policy (vLLM installed,
    model_name_or_path a saved model it serves)."""
    if cfg.generation_backend == "vllm":
        from .generation_vllm import check_policy

        check_policy(cfg.model_name_or_path, engine_options(cfg), label="config: model_name_or_path")


def partial_path(out_path: Path) -> Path:
    """Where a generation writing ``out_path`` keeps its finished batches until it is done."""
    return out_path.with_name(out_path.name + ".partial")


def generate_field(model, tokenizer, records: list[dict], out_path: str | Path, field: str, cfg, *, seed: int,
                   desc: str | None = None, weights: str | Path | None = None) -> list[dict]:
    """Write `records` + `field` (sampled responses) + `<field>_ids` (their token ids) + `<field>_truncated` to
    `out_path` (JSONL, atomic, resumable); cached if it exists. `weights`: as `backend_kwargs`."""
    out_path = Path(out_path)
    if out_path.exists():
        from .data import load_records

        return load_records(out_path, require_response=False)
    partial = partial_path(out_path)
    samples = generate_samples(model, tokenizer, [r["prompt"] for r in records], template=cfg.prompt_template,
                               max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                               batch_size=cfg.generation_batch_size, seed=seed, partial_path=partial,
                               progress=cfg.progress, desc=desc or f"generate {field}", **backend_kwargs(cfg, weights))
    rows = [{**r, field: s.text, f"{field}_ids": s.token_ids, f"{field}_truncated": s.truncated}
            for r, s in zip(records, samples)]
    on_main(_finish, out_path, rows, partial)
    return rows


def _finish(out_path: Path, rows: list[dict], partial: Path) -> None:
    atomic_write_jsonl(out_path, rows)
    partial.unlink(missing_ok=True)
