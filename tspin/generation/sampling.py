"""Batched, seeded, resumable generation, shared out over the ranks under torchrun: Hugging Face `generate` (KV
cache, left padding; here) or vLLM (`generation_backend: vllm`, :mod:`tspin.generation.vllm_backend`).

Each finished batch is appended to `<out>.partial` (:mod:`tspin.generation.samples`); a restarted run keeps those
and goes on from the next batch. Every batch seeds its own sampling from (seed, batch index), so a resumed run
writes exactly what an uninterrupted one would. The final file appears in one rename.

A sample keeps its token ids (trained on as they are: re-tokenizing the text can give other ids) and whether it
was cut at max_new_tokens. Sampling stops at any of the model's stop tokens (:func:`tspin.data.stop_token_ids`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..choices import GENERATION_BACKENDS
from ..data import encode_prompts, load_records, stop_token_ids
from ..io import atomic_write_jsonl
from ..ranks import on_main, world
from ..wrapping import policy_of
from .samples import Sample, append_partial, partial_path, resume_partial, sample_of, samples_of, sharded_generate

BACKENDS = GENERATION_BACKENDS


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled: the prompt template and its token limit, the sampler's settings, the batch size
    (backend hf), the progress bar, the backend and, for 'vllm', its engine (:class:`~.vllm_engine.EngineOptions`
    fields). ``temperature`` 0 is greedy."""

    template: str
    max_prompt_length: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16
    progress: bool = True
    backend: str = "hf"
    engine: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        """generate_samples' keywords."""
        return asdict(self)


def generate_texts(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """Responses to `prompts` (raw instructions; the template is applied here), in input order; kwargs as
    `generate_samples`."""
    return [s.text for s in generate_samples(model, tokenizer, prompts, **kwargs)]


def generate_samples(model, tokenizer, prompts: list[str], *, seed: int = 0, partial_path: str | Path | None = None,
                     progress: bool = True, backend: str = "hf", weights: str | Path | None = None,
                     engine: dict | None = None, **kwargs) -> list[Sample]:
    """Samples for `prompts`, in input order; kwargs as `_generate_local`. Backend 'hf' samples with `model`, the
    training policy (tspin.wrapping.wrap_model: one process, DDP, FSDP2); backend 'vllm' samples from the saved
    policy in `weights` (a save_pretrained or LoRA-adapter directory; `engine`:
    tspin.generation.vllm_engine.EngineOptions fields) and ignores `model`.

    Under torchrun every rank must call this: each samples its share of the prompts and all get the full list. The
    partial file (resume inside a generation) is single-process only: ranks would share it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        from .vllm_backend import generate_samples as vllm_samples

        return vllm_samples(weights, tokenizer, prompts, seed=seed, partial_path=partial_path, progress=progress,
                            engine=engine, **kwargs)
    policy = policy_of(model)  # DDP has no generate; under FSDP2 the policy's generate gathers the root's weights
    rank, world_size = world()
    if world_size == 1:
        return _generate_local(policy, tokenizer, prompts, seed=seed, partial_path=partial_path, progress=progress,
                               **kwargs)
    return sharded_generate(prompts, lambda ps: _generate_local(policy, tokenizer, ps, seed=seed + 7919 * rank,
                                                                progress=progress and rank == 0, **kwargs))


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


def check_backend(backend: str, policy: str, engine: dict, label: str = "config: model_name_or_path") -> None:
    """Before a command loads anything: ``backend`` can sample the initial ``policy`` (vLLM installed, the policy a
    saved model it serves; ``engine``: EngineOptions fields). ``label`` names where ``policy`` came from."""
    if backend == "vllm":
        from .vllm_backend import check_policy

        check_policy(policy, engine, label=label)


def generate_field(model, tokenizer, records: list[dict], out_path: str | Path, field: str,
                   sampling: SamplingSettings, *, seed: int, desc: str | None = None,
                   weights: str | Path | None = None) -> list[dict]:
    """Write `records` + `field` (sampled responses) + `<field>_ids` (their token ids) + `<field>_truncated` to
    `out_path` (JSONL, atomic, resumable); cached if it exists. `weights`: the saved policy the in-memory `model`
    was loaded from or saved to (what backend 'vllm' samples from)."""
    out_path = Path(out_path)
    if out_path.exists():
        return load_records(out_path, require_response=False)
    partial = partial_path(out_path)
    samples = generate_samples(model, tokenizer, [r["prompt"] for r in records], seed=seed, partial_path=partial,
                               desc=desc or f"generate {field}", weights=weights, **sampling.kwargs())
    rows = [{**r, field: s.text, f"{field}_ids": s.token_ids, f"{field}_truncated": s.truncated}
            for r, s in zip(records, samples)]
    on_main(_finish, out_path, rows, partial)
    return rows


def _finish(out_path: Path, rows: list[dict], partial: Path) -> None:
    atomic_write_jsonl(out_path, rows)
    partial.unlink(missing_ok=True)
