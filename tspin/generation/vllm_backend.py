"""vLLM generation backend (`generation_backend: vllm`): the contract of tspin.generation.generate_samples.

Same prompts and templates (tokenized here by `encode_prompts`, decoded here by the run's tokenizer, so the text
is what the HF backend writes), temperature / top_p / top_k (0: off), max_new_tokens, EOS as the stop id, and
`truncated` when a sample ran to max_new_tokens. Seeds are per prompt, from (seed, prompt index): a sample does not
depend on its batch, on the chunking or on the number of ranks, and a resumed run writes what an uninterrupted one
would. Prompts go to the engine in chunks of `chunk_size`; each finished chunk is appended to the `.partial` file.
Under torchrun prompt i goes to rank i mod N, each rank sampling with its own engine.

The engine (start, weight hand-off, sleep between uses, memory plan) is :mod:`tspin.generation.vllm_engine`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..data import encode_prompts, stop_token_ids
from ..ranks import world
from .samples import Sample, append_partial, resume_partial, sample_of, samples_of, sharded_generate
from .vllm_engine import LORA_RANKS, EngineOptions, Policy, engine_for, on_cuda, require_vllm


def resolve_policy(weights, opts: EngineOptions, label: str = "weights") -> Policy:
    """The policy in `weights`, checked: a directory with config.json + *.safetensors or an adapter directory.
    `label` names where `weights` came from in the messages."""
    if weights is None:
        raise ValueError("generation_backend='vllm' samples from a saved policy: pass weights=<directory written by "
                         "save_pretrained> (the self-play commands pass the run's model directories)")
    path = Path(weights)
    if not path.is_dir():
        raise FileNotFoundError(f"{label}: {str(path)!r} is not a directory (generation_backend='vllm' loads a "
                                "save_pretrained model or a LoRA adapter directory)")
    if (path / "adapter_config.json").exists():
        cfg = json.loads((path / "adapter_config.json").read_text())
        base = opts.base_model or cfg.get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").exists():
            raise FileNotFoundError(f"{label}: {path} is a LoRA adapter; its base model {base!r} is not a local model "
                                    "directory (give the run's model_name_or_path as a local directory)")
        return Policy(path, Path(base), int(cfg.get("r") or opts.lora_rank or 8))
    if not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{label}: {path} holds no config.json + *.safetensors (save the model with "
                                "save_pretrained(..., safe_serialization=True))")
    return Policy(path, path)


def check_shapes(policy: Policy, opts: EngineOptions) -> None:
    """Settings vLLM would reject deep inside its engine process, checked here with a plain message."""
    rank = max(policy.adapter_rank, opts.lora_rank)
    if rank > LORA_RANKS[-1]:
        raise ValueError(f"lora_rank={rank}: vLLM serves LoRA adapters up to rank {LORA_RANKS[-1]}")
    if on_cuda(opts):
        return
    cfg = policy.config
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    try:  # the CPU attention kernels exist for a fixed set of head sizes
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):  # another vLLM layout: vLLM checks it itself
        return
    if head_dim not in supported:
        raise ValueError(f"{policy.model_dir}: head_dim={head_dim} (hidden_size / num_attention_heads) is not "
                         f"supported by vLLM's CPU attention (supported: {', '.join(map(str, supported))}); use "
                         "generation_backend=hf for this model")


def check_policy(weights, engine: dict | EngineOptions | None = None, label: str = "weights") -> Policy:
    """vLLM is installed (else VLLMNotInstalledError naming the extra) and can serve the saved policy in `weights`;
    nothing is started."""
    opts = engine if isinstance(engine, EngineOptions) else EngineOptions(**(engine or {}))
    require_vllm()
    policy = resolve_policy(weights, opts, label)
    check_shapes(policy, opts)
    return policy


def _seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (1 << 63)


def generate_samples(weights, tokenizer, prompts: list[str], *, template: str, max_prompt_length: int,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     batch_size: int | None = None, seed: int = 0, partial_path: str | Path | None = None,
                     progress: bool = True, desc: str = "generate", engine: dict | EngineOptions | None = None,
                     chunk_size: int = 1024) -> list[Sample]:
    """Samples for `prompts` from the saved policy `weights`, in input order (see the module doc).

    `batch_size` is the HF backend's and is ignored: vLLM schedules its own batches. `chunk_size`: prompts per
    engine call, the unit of resume. Under torchrun every rank must call this and all get the full list.
    """
    del batch_size
    opts = engine if isinstance(engine, EngineOptions) else EngineOptions(**(engine or {}))
    for name, value, ok, expected in (
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
            ("max_prompt_length", max_prompt_length, max_prompt_length >= 1, ">= 1"),
            ("chunk_size", chunk_size, chunk_size >= 1, ">= 1"), ("temperature", temperature, temperature >= 0, ">= 0"),
            ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"), ("top_k", top_k, top_k >= 0, ">= 0 (0: off)")):
        if not ok:
            raise ValueError(f"{name}={value!r}: expected {expected}")
    policy = check_policy(weights, opts)
    ids = encode_prompts(tokenizer, prompts, template, max_prompt_length)
    # from the settings, not from these prompts: the next call (same run, other prompts) reuses the engine
    needed = max(max_prompt_length + max_new_tokens, 512)
    max_model_len = min(needed, policy.config.get("max_position_embeddings") or needed)
    gen_config = None
    if (policy.model_dir / "generation_config.json").exists():
        from transformers import GenerationConfig

        gen_config = GenerationConfig.from_pretrained(policy.model_dir)
    stops = stop_token_ids(tokenizer, template, gen_config)  # as the HF backend's: every stop token
    run = dict(policy=policy, tokenizer=tokenizer, ids=ids, stops=stops, max_model_len=max_model_len, opts=opts,
               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
               chunk_size=chunk_size, desc=desc)
    rank, world_size = world()
    if world_size == 1:
        return _sample(list(range(len(ids))), partial=Path(partial_path) if partial_path else None,
                       progress=progress, **run)
    return sharded_generate(list(range(len(ids))),
                            lambda idx: _sample(idx, partial=None, progress=progress and rank == 0, **run))


def _as_sample(out, stops: list[int], tokenizer) -> Sample:
    """A vLLM completion as a Sample: its token ids with the stop token it ended on (what the policy sampled)."""
    ids = list(out.token_ids)
    if out.finish_reason != "length" and not (ids and ids[-1] in stops):  # stopped, the stop id not in the ids
        ids.append(out.stop_reason if isinstance(out.stop_reason, int) else tokenizer.eos_token_id)
    return sample_of(ids, stops, tokenizer)


def _sample(index: list[int], *, policy: Policy, tokenizer, ids: list[list[int]], stops: list[int], max_model_len: int,
            opts: EngineOptions, max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int,
            chunk_size: int, partial: Path | None, progress: bool, desc: str) -> list[Sample]:
    """Samples for the prompts `index` (positions in `ids`, which also seed them), chunk by chunk, resumable."""
    chunks = [index[i: i + chunk_size] for i in range(0, len(index), chunk_size)]
    done = resume_partial(partial, chunks)
    results: dict[int, Sample] = {i: s for d in done for i, s in zip(d["index"], samples_of(d))}
    if len(done) == len(chunks):
        return [results[i] for i in index]
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = engine_for(policy, max_model_len, opts)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 else dict(temperature=0.0)
    bar = tqdm(total=len(index), initial=sum(len(c) for c in chunks[:len(done)]), desc=f"{desc} (vllm)",
               disable=not progress, leave=False)
    try:
        lora = eng.lora_request(policy)
        for c, idx in enumerate(chunks):
            if c < len(done):
                continue
            params = [SamplingParams(max_tokens=max_new_tokens, stop_token_ids=stops,
                                     detokenize=False, seed=_seed(seed, i), **sampling) for i in idx]
            outs = eng.llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in idx], params, use_tqdm=False,
                                    lora_request=lora)
            samples = [_as_sample(o.outputs[0], stops, tokenizer) for o in outs]
            results.update(zip(idx, samples))
            append_partial(partial, c, idx, samples)
            bar.update(len(idx))
    finally:
        bar.close()
        eng.sleep()
    return [results[i] for i in index]
