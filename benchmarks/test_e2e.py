"""End-to-end T-SPIN optimizer step: fused path (``tspin``) vs the naive Hugging Face path (``naive_hf``).

CPU: toy configs, each path checked against the other (same loss and gradients) and one step recorded.
GPU: Llama-1B-shaped full fine-tuning (tokens/s, peak memory at B triplets; ``TSPIN_E2E_B``, default 2), and the
largest triplet batch that fits per path for Llama-1B and for Mistral-7B-shaped LoRA + gradient checkpointing.
``tspin`` runs the library's defaults; each record holds the path they resolved to (``loss_path``).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from benchmarks import common, e2e
from tspin_kernels import loss_path

E2E_B = [int(b) for b in os.environ.get("TSPIN_E2E_B", "2").split(",")]


@pytest.fixture(autouse=True, scope="module")
def _release_model():
    yield
    e2e.release()  # the 7B model must not stay on the GPU for the next module


def _bench_timer(benchmark):
    def timer(step, steps):
        benchmark.pedantic(step, rounds=steps, warmup_rounds=0)
        return common.median_seconds(benchmark)

    return timer


def _record(benchmark, res: dict, device, mode: str = "train_step", **extra) -> None:
    common.record(
        benchmark, device, impl=res["path"], shape=f"{res['config']}-e2e", mode=mode,
        head="frozen" if res["lora"] else "trainable", **{k: v for k, v in res.items() if k not in ("path",)}, **extra,
    )


def test_largest_fitting_search():
    assert e2e.largest_fitting(lambda b: b <= 13, cap=64) == 13
    assert e2e.largest_fitting(lambda b: b <= 13, cap=64, start=4) == 13
    assert e2e.largest_fitting(lambda b: b <= 13, cap=10) == 10
    assert e2e.largest_fitting(lambda b: b <= 3, cap=64, start=8) == 3
    assert e2e.largest_fitting(lambda b: False, cap=64) == 0
    tried = []
    e2e.largest_fitting(lambda b: tried.append(b) or b <= 40, cap=256)
    assert len(tried) <= 12 and len(set(tried)) == len(tried)


def test_max_batch_counts_oom(monkeypatch):
    """The search treats an out-of-memory step as "does not fit" and recovers (simulated OOM above 3 triplets)."""
    cfg = dataclasses.replace(e2e.CONFIGS["toy"], max_batch_cap=64)
    real_step = e2e.train_step

    def step(model, opt, path, ids, labels, kernel=None):
        if ids.shape[0] > 9:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(model, opt, path, ids, labels, kernel)

    monkeypatch.setattr(e2e, "train_step", step)
    assert e2e.max_batch(cfg, "tspin", "cpu", torch.float32) == 3


@pytest.mark.parametrize("config", ["toy", "toy-lora"])
def test_e2e_paths_agree_cpu(config):
    """Both paths compute the same T-SPIN loss and the same gradients on the same weights."""
    cfg = e2e.CONFIGS[config]
    model = e2e.build_model(cfg, "cpu", torch.float32)
    ids, labels = e2e.make_batch(cfg, 2, "cpu")
    out = []
    for fn in (e2e.loss_tspin, e2e.loss_naive_hf):
        model.zero_grad(set_to_none=True)
        loss = fn(model, ids, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append((loss.detach(), grads))
    (l1, g1), (l2, g2) = out
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-5)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("path", e2e.PATHS)
@pytest.mark.parametrize("config", ["toy", "toy-lora"])
def test_e2e_cpu(benchmark, config, path):
    benchmark.group = f"e2e-{config}"
    cfg = e2e.CONFIGS[config]
    model, opt = e2e.cached_model(cfg, "cpu", torch.float32)
    res = e2e.measure(model, opt, cfg, path, 2, "cpu", steps=3, warmup=1 - benchmark.disabled,
                      timer=_bench_timer(benchmark))
    if path == "tspin":  # the library's defaults, and the path they took, recorded with the numbers
        assert res["kernel_options"] == {} and res["loss_path"] == dataclasses.asdict(loss_path("cpu"))
    found = e2e.max_batch(cfg, path, "cpu", torch.float32)  # the search runs (cap 2: no OOM on CPU)
    _record(benchmark, res, "cpu", max_batch_triplets=found, max_batch_cap=cfg.max_batch_cap)


@pytest.mark.gpu
@pytest.mark.parametrize("path", e2e.PATHS)
@pytest.mark.parametrize("B", E2E_B)
def test_e2e_gpu_throughput(benchmark, B, path):
    cfg = e2e.CONFIGS["llama-1b"]
    benchmark.group = f"e2e-{cfg.name}-B{B}"
    model, opt = e2e.cached_model(cfg, "cuda", torch.bfloat16)
    res = e2e.measure(model, opt, cfg, path, B, "cuda", steps=5, warmup=2, timer=_bench_timer(benchmark))
    _record(benchmark, res, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("path", e2e.PATHS)
@pytest.mark.parametrize("config", ["llama-1b", "mistral-7b-lora"])
def test_e2e_gpu_max_batch(benchmark, config, path):
    """Largest triplet batch (T=1024) whose optimizer step fits in this GPU's memory; then a timed step at it."""
    cfg = e2e.CONFIGS[config]
    benchmark.group = f"e2e-{cfg.name}-max-batch"
    found = e2e.max_batch(cfg, path, "cuda", torch.bfloat16)
    total = torch.cuda.get_device_properties(0).total_memory
    if found == 0:
        pytest.fail(f"{config}/{path}: not even one triplet fits in {total / 2**30:.0f} GiB")
    model, opt = e2e.cached_model(cfg, "cuda", torch.bfloat16)
    # the search just ran a step at this size: no warm-up needed
    res = e2e.measure(model, opt, cfg, path, found, "cuda", steps=2, warmup=0, timer=_bench_timer(benchmark))
    _record(benchmark, res, "cuda", max_batch_triplets=found, max_batch_cap=cfg.max_batch_cap,
            gpu_total_mem_bytes=total, mode="max_batch")
