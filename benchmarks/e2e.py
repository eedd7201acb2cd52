"""End-to-end benchmark: one T-SPIN optimizer step on a random-init causal LM, our fused path vs the naive HF path.

- ``tspin``: ``backbone(...) -> last hidden states -> tspin_loss(hidden, lm_head.weight, labels, shift=True)``
  (no [tokens x vocab] logits anywhere), with the library's defaults unless options are given; every result
  records the path the call took (``loss_path``: impl, fused, backward, ...).
- ``naive_hf``: ``model(...).logits -> float -> log_softmax -> gather -> masked per-row sum -> T-SPIN loss``.

A batch is B triplets = 3B rows of T random tokens, the first half of each row prompt (ignored).
Configs (random init, built from ``transformers`` configs, never downloaded):

- ``llama-1b``: Llama-3.2-1B shape (D=2048, 16 layers, V=128256, tied embeddings), full fine-tuning, AdamW.
- ``mistral-7b-lora``: Mistral-7B shape (D=4096, 32 layers, V=32000), LoRA r=16 on q/k/v/o, gradient checkpointing.
- ``toy`` / ``toy-lora``: tiny versions of the two, for CPU (so the code cannot rot).

CLI (prints JSON lines; the pytest suite ``benchmarks/test_e2e.py`` records the same numbers into the results file):

    python -m benchmarks.e2e --config llama-1b --path tspin --B 2 [--max-batch] [--fused false --backward atomic]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks import common
from tspin_kernels import loss_path, tspin_loss, tspin_loss_from_logps
from tspin_kernels.integrations.hf import backbone_and_head

PATHS = ("tspin", "naive_hf")


@dataclass(frozen=True)
class E2EConfig:
    name: str
    family: str  # "llama" | "mistral"
    D: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    V: int
    T: int
    lora: bool
    checkpointing: bool
    tie: bool
    max_batch_cap: int  # upper bound of the largest-batch search (triplets)
    max_batch_start: int = 1  # first size tried (doubling from there saves the small, certain steps)


CONFIGS = {
    "llama-1b": E2EConfig("llama-1b", "llama", 2048, 16, 32, 8, 8192, 128256, 1024, False, False, True, 64, 2),
    "mistral-7b-lora": E2EConfig("mistral-7b-lora", "mistral", 4096, 32, 32, 8, 14336, 32000, 1024, True, True,
                                 False, 256, 8),
    "toy": E2EConfig("toy", "llama", 64, 2, 4, 2, 128, 1000, 32, False, False, True, 2),
    "toy-lora": E2EConfig("toy-lora", "mistral", 64, 2, 4, 2, 128, 1000, 32, True, True, False, 2),
}


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: E2EConfig, device, dtype, seed: int = 0):
    """Random-init model (on ``device`` directly, in ``dtype``), LoRA-wrapped and checkpointed when configured."""
    import transformers

    common_kw = dict(hidden_size=cfg.D, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                     num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ffn, vocab_size=cfg.V,
                     max_position_embeddings=max(2048, cfg.T), tie_word_embeddings=cfg.tie, use_cache=False)
    if cfg.family == "llama":
        config = transformers.LlamaConfig(rope_theta=500000.0, **common_kw)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.MistralConfig(sliding_window=None, **common_kw)
        cls = transformers.MistralForCausalLM
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = cls(config)
    model.to(device=device, dtype=dtype)
    if cfg.checkpointing:
        with warnings.catch_warnings():  # renamed activation_checkpointing_enable in transformers >= 5.2x
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    return model


def make_batch(cfg: E2EConfig, B: int, device, seed: int = 0):
    """3B rows [real; generated; proto] of T random tokens; HF-style labels (= input_ids), first half ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.V, (3 * B, cfg.T), generator=g)
    labels = ids.clone()
    labels[:, : cfg.T // 2] = -100
    return ids.to(device), labels.to(device)


def loss_tspin(model, ids, labels, kernel: dict | None = None):
    """``kernel``: keyword options of tspin_kernels.tspin_loss (impl, backward, tiles, ...)."""
    decoder, head = backbone_and_head(model)  # the same lookup as the trainer (tspin_kernels.integrations)
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    return tspin_loss(hidden, head.weight, labels, shift=True, **(kernel or {})).loss


def loss_naive_hf(model, ids, labels):
    logits = model(input_ids=ids, use_cache=False).logits
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    mask = target != -100
    tok = F.log_softmax(logits, dim=-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logps = (tok * mask).sum(-1)
    return tspin_loss_from_logps(*logps.chunk(3))


def make_optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=fused)


def train_step(model, opt, path: str, ids, labels, kernel: dict | None = None) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = loss_tspin(model, ids, labels, kernel) if path == "tspin" else loss_naive_hf(model, ids, labels)
    loss.backward()
    opt.step()
    return loss.detach()


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def fits(model, opt, cfg: E2EConfig, path: str, B: int, device, kernel: dict | None = None) -> bool:
    """Whether one full optimizer step at B triplets runs without running out of device memory."""
    ok = True
    try:
        ids, labels = make_batch(cfg, B, device)
        train_step(model, opt, path, ids, labels, kernel)
        common.sync(device)
    except torch.cuda.OutOfMemoryError:
        ok = False
    except RuntimeError as e:  # cuBLAS/cuDNN workspace allocations fail with their own messages
        if not any(m in str(e) for m in ("out of memory", "ALLOC_FAILED", "CUBLAS_STATUS_NOT_INITIALIZED")):
            raise
        ok = False
    ids = labels = None
    opt.zero_grad(set_to_none=True)
    _free(device)
    return ok


def largest_fitting(fits_fn, cap: int, start: int = 1) -> int:
    """Largest b in [1, cap] with ``fits_fn(b)`` (assumed monotone): doubling from ``start``, then bisection.

    0 when even b=1 does not fit.
    """
    start = max(1, min(start, cap))
    if not fits_fn(start):
        if start == 1:
            return 0
        return largest_fitting(fits_fn, start - 1, 1)
    lo = start
    hi = None  # smallest known failure
    while hi is None:
        nxt = min(2 * lo, cap)
        if nxt == lo:
            return lo
        if fits_fn(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits_fn(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _time_steps(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_flops_per_token(model, cfg: E2EConfig) -> float:
    """PaLM-style useful FLOPs per token of one step: 6N + 12*L*D*T for full fine-tuning (N = matmul parameters,
    the LM head included once), 4N + 8*L*D*T with LoRA (no weight gradients; checkpoint recompute not counted)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lora_" not in name)
    if cfg.tie:
        n += cfg.V * cfg.D  # the tied head's matmul is real work although its parameter is the embedding
    per_param, per_attn = (4, 8) if cfg.lora else (6, 12)
    return per_param * n + per_attn * cfg.layers * cfg.D * cfg.T


def measure(model, opt, cfg: E2EConfig, path: str, B: int, device, *, steps: int = 5, warmup: int = 2,
            kernel: dict | None = None, timer=None) -> dict:
    """Median step time, tokens/s and peak memory of ``steps`` optimizer steps at B triplets (after ``warmup``).

    ``timer(step, steps) -> median seconds or None`` replaces the built-in timing (the pytest suite passes
    pytest-benchmark's). Peak memory is the absolute CUDA peak over the timed steps (model, optimizer state and
    activations); ``peak_rise_bytes`` is that minus what was allocated between steps (None off CUDA).
    """
    ids, labels = make_batch(cfg, B, device)

    def step():
        train_step(model, opt, path, ids, labels, kernel)
        common.sync(device)

    for _ in range(warmup):
        step()
    opt.zero_grad(set_to_none=True)
    _free(device)
    cuda = torch.device(device).type == "cuda"
    static = torch.cuda.memory_allocated(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    median = (timer or _time_steps)(step, steps)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    tokens = 3 * B * cfg.T
    flops = model_flops_per_token(model, cfg) * tokens
    return {
        "config": cfg.name, "path": path, "B": B, "T": cfg.T, "tokens_per_step": tokens,
        "step_seconds": median, "tokens_per_s": tokens / median if median else None,
        "tflops": flops / median / 1e12 if median else None, "peak_mem_bytes": peak,
        "static_mem_bytes": static, "peak_rise_bytes": (peak - static) if cuda else None,
        "lora": cfg.lora, "checkpointing": cfg.checkpointing, **path_ran(path, device, kernel),
    }


def path_ran(path: str, device, kernel: dict | None = None) -> dict:
    """What the ``tspin`` path's loss call ran: its options (``kernel_options``, {} = the library's defaults) and
    the path tspin_kernels resolved them to on ``device`` (``loss_path``)."""
    if path != "tspin":
        return {}
    kernel = {k: v for k, v in (kernel or {}).items() if v is not None}
    return {"kernel_options": kernel, "loss_path": dataclasses.asdict(loss_path(device, **kernel))}


_CACHE: dict = {}


def cached_model(cfg: E2EConfig, device, dtype):
    """One model (and optimizer) alive at a time, shared by the paths (both start from the same init)."""
    key = (cfg.name, str(device), dtype)
    if _CACHE.get("key") != key:
        _CACHE.clear()
        _free(device)
        model = build_model(cfg, device, dtype)
        _CACHE.update(key=key, model=model, opt=make_optimizer(model))
    return _CACHE["model"], _CACHE["opt"]


def release() -> None:
    """Drop the cached model and optimizer (end of a test module)."""
    device = _CACHE.get("key", (None, "cpu"))[1]
    _CACHE.clear()
    _free(device)


def max_batch(cfg: E2EConfig, path: str, device, dtype, kernel: dict | None = None) -> int:
    model, opt = cached_model(cfg, device, dtype)
    return largest_fitting(lambda b: fits(model, opt, cfg, path, b, device, kernel), cfg.max_batch_cap,
                           cfg.max_batch_start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="one T-SPIN optimizer step: fused path vs naive HF path")
    p.add_argument("--config", choices=sorted(CONFIGS), default="toy")
    p.add_argument("--path", choices=PATHS + ("both",), default="both")
    p.add_argument("--B", type=int, default=2, help="triplets per step for the throughput measurement")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--max-batch", action="store_true", help="also search the largest triplet batch that fits")
    p.add_argument("--impl", default=None, choices=["auto", "triton", "torch", "reference"],
                   help="tspin_kernels impl for the tspin path (default: the library's)")
    p.add_argument("--fused", default=None, choices=["true", "false"],
                   help="tspin_loss' fused for the tspin path (default: the library's)")
    p.add_argument("--backward", default=None, choices=["atomic", "matmul"],
                   help="the Triton backward for the tspin path (default: the library's)")
    a = p.parse_args(argv)
    device = common.bench_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = CONFIGS[a.config]
    fused = None if a.fused is None else a.fused == "true"
    kernel = {k: v for k, v in dict(impl=a.impl, fused=fused, backward=a.backward).items() if v is not None}
    model, opt = cached_model(cfg, device, dtype)
    for path in PATHS if a.path == "both" else (a.path,):
        res = measure(model, opt, cfg, path, a.B, device, steps=a.steps, kernel=kernel)
        if a.max_batch:
            res["max_batch_triplets"] = max_batch(cfg, path, device, dtype, kernel)
        print(json.dumps(dict(res, **common.provenance())), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
