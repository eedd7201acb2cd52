"""GPU check for the scale-out / scale-down paths (issue 5 item 5); writes one JSON under benchmarks/results/.

1. ``fsdp2``: one T-SPIN SGD step of a random-init Llama through ``wrap_model(..., "fsdp2")`` on this one GPU (a
   world of 1: the same hooks, all-gathers and reduce-scatters as N ranks) against the unwrapped model: loss,
   gradients and post-step weights must agree. Then a bf16 mixed-precision FSDP2 step: time and peak memory.
2. ``lora7b``: Mistral-7B shape (random init, bf16, gradient checkpointing, LoRA r=16 on every block linear layer,
   frozen head), B triplets x T tokens, AdamW: peak memory and step time next to the tspin.memory estimate.

    python scripts/gpu_fsdp_lora_check.py                 # on a GPU machine (nccl)
    torchrun --nproc_per_node 8 scripts/gpu_fsdp_lora_check.py --only fsdp2   # the same check on 8 ranks
    python scripts/gpu_fsdp_lora_check.py --toy --out /tmp/x.json            # tiny shapes on CPU (gloo)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tspin.checkpoint import model_state_dict  # noqa: E402
from tspin.memory import SHAPES, estimate_bytes  # noqa: E402
from tspin.models import apply_lora, enable_gradient_checkpointing  # noqa: E402
from tspin.ranks import cleanup_distributed, init_distributed  # noqa: E402
from tspin.wrapping import wrap_model  # noqa: E402
from tspin_kernels import tspin_loss_from_logps  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init():
    if "WORLD_SIZE" not in os.environ:  # plain `python script.py`: a world of one, so FSDP2 has a process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    return init_distributed()


def _commit() -> str:
    env = os.environ.get("TSPIN_COMMIT", "").strip()
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _provenance(device: torch.device) -> dict:
    import peft
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "triton": triton_version, "commit": _commit(),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _batch(num_triplets: int, seq_len: int, vocab: int, device, seed: int = 0) -> dict:
    """3B rows [real; generated; proto] of random tokens; the first half of each row is prompt (ignored)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3 * num_triplets, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100
    mask = torch.ones_like(ids)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _step(policy, rows, opt, collect: bool = True):
    logps = policy(**rows)
    loss = tspin_loss_from_logps(*logps.chunk(3), alpha=1.0, beta=0.1)
    loss.backward()
    grads = {}
    for n, p in policy.named_parameters():
        if collect and p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[n.removeprefix("model.")] = g.detach().float().cpu()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().float().item(), grads


def _timed_steps(policy, rows, opt, device, n: int = 3) -> tuple[list[float], float]:
    """Losses of n optimizer steps and the median step time (the first includes warm-up)."""
    losses, times = [], []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        losses.append(_step(policy, rows, opt, collect=False)[0])
        _sync(device)
        times.append(time.perf_counter() - t0)
    return losses, sorted(times)[n // 2]


def _llama(toy: bool, device, dtype=torch.float32, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if toy:
        cfg = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    else:  # ~0.6B: large enough for real all-gathers, small enough for an fp32 reference copy
        cfg = LlamaConfig(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def check_fsdp2(info, toy: bool, num_triplets: int, seq_len: int) -> dict:
    dev = info.device
    rows = _batch(num_triplets, seq_len, 257 if toy else 32000, dev, seed=info.rank)
    lr = 1e-2
    ref = wrap_model(_llama(toy, dev), "none", info=info)
    ref_loss, ref_grads = _step(ref, rows, torch.optim.SGD(ref.parameters(), lr=lr))
    ref_params = {k: v.detach().float().cpu() for k, v in ref.model.state_dict().items()}
    del ref
    sharded = wrap_model(_llama(toy, dev), "fsdp2", info=info)
    loss, grads = _step(sharded, rows, torch.optim.SGD(sharded.parameters(), lr=lr))
    params = model_state_dict(sharded)
    out = {"world_size": info.world_size, "num_triplets": num_triplets, "seq_len": seq_len}
    if info.world_size == 1:  # with more ranks each holds other rows: compare the loss path only on one
        def max_rel(a: dict, b: dict) -> float:
            return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)

        out.update(loss=loss, ref_loss=ref_loss, loss_abs_diff=abs(loss - ref_loss),
                   grad_max_rel_diff=max_rel(grads, ref_grads),
                   param_max_rel_diff=max_rel({k: v.float() for k, v in params.items()}, ref_params))
        out["match"] = bool(out["loss_abs_diff"] < 1e-4 * max(1.0, abs(ref_loss)) and out["grad_max_rel_diff"] < 1e-3
                            and out["param_max_rel_diff"] < 1e-3)
    del sharded, params, grads, ref_grads, ref_params

    # bf16 mixed precision (fp32 sharded master weights), the configuration to train with
    base = _reset_peak(dev)
    mp = wrap_model(_llama(toy, dev), "fsdp2", info=info, param_dtype=torch.bfloat16 if dev.type == "cuda" else None)
    losses, step_s = _timed_steps(mp, rows, torch.optim.AdamW(mp.parameters(), lr=1e-5), dev)
    out["mixed_precision"] = {"param_dtype": "bfloat16" if dev.type == "cuda" else "float32", "losses": losses,
                              "step_s": step_s, "peak_mem_bytes": _peak(dev), "base_mem_bytes": base}
    return out


def check_lora7b(info, toy: bool, num_triplets: int, seq_len: int, rank: int) -> dict:
    from transformers import AutoModelForCausalLM, MistralConfig

    dev = info.device
    if toy:
        cfg = MistralConfig(vocab_size=257, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    else:
        cfg = MistralConfig()  # the defaults are Mistral-7B-v0.1: D=4096, 32 layers, I=14336, V=32000
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base = _reset_peak(dev)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    model = enable_gradient_checkpointing(apply_lora(model, r=rank, alpha=2 * rank))
    head = model.get_output_embeddings()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    policy = wrap_model(model, "none", info=info)
    policy.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    rows = _batch(num_triplets, seq_len, cfg.vocab_size, dev)
    weights_mem = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    losses, step_s = _timed_steps(policy, rows, opt, dev)
    assert head.weight.grad is None and not head.weight.requires_grad, "the LM head must stay frozen"
    shape = SHAPES["mistral-7b"]
    est = estimate_bytes(shape, "lora", seq_len=seq_len, triplets=num_triplets, lora_rank=rank)
    return {"config": "toy-mistral" if toy else "mistral-7b", "dtype": str(dtype).removeprefix("torch."),
            "params": n_params, "trainable_params": trainable, "lora_rank": rank, "num_triplets": num_triplets,
            "seq_len": seq_len, "gradient_checkpointing": True, "head_frozen": True, "losses": losses,
            "finite": all(math.isfinite(x) for x in losses),
            "step_s": step_s, "init_s": init_s, "base_mem_bytes": base, "weights_mem_bytes": weights_mem,
            "peak_mem_bytes": _peak(dev),
            "estimate_bytes": None if toy else {k: int(v) for k, v in est.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy", action="store_true", help="tiny shapes (CPU-friendly), for the test suite")
    p.add_argument("--only", choices=("fsdp2", "lora7b"), default=None)
    p.add_argument("--triplets", type=int, default=None, help="triplets per step (default 4, toy 2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 1024, toy 16)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/"
                                                          "fsdp-lora-<device>-<yyyymmdd>.json)")
    a = p.parse_args(argv)
    triplets = a.triplets or (2 if a.toy else 4)
    seq_len = a.seq_len or (16 if a.toy else 1024)
    if triplets < 1 or seq_len < 4:
        p.error("--triplets must be >= 1 and --seq-len >= 4")
    if not a.toy and not torch.cuda.is_available():  # a 7B model on CPU would only exhaust host memory
        p.error("the full-size check needs a CUDA GPU; use --toy for the tiny CPU version")
    info = _init()
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 FSDP2-vs-plain comparison wants exact fp32
    result = {**_provenance(info.device), "toy": a.toy}
    try:
        if a.only in (None, "fsdp2"):
            result["fsdp2"] = check_fsdp2(info, a.toy, triplets, seq_len)
        if a.only in (None, "lora7b") and info.is_main and info.world_size == 1:
            result["lora7b"] = check_lora7b(info, a.toy, triplets, seq_len, a.lora_rank)
    finally:
        cleanup_distributed()
    if not info.is_main:
        return 0
    slug = "".join(c if c.isalnum() else "-" for c in result["device"].lower()).strip("-")
    day = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d}"
    out = a.out or ROOT / "benchmarks" / "results" / f"fsdp-lora-{slug}-{day}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(json.dumps(result, indent=2))
    ok = result.get("fsdp2", {}).get("match", True) and result.get("lora7b", {}).get("finite", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
