"""Batch layouts for a full T-SPIN optimizer step: padded vs packed vs shared-prefix at r = P/L in {0.5, 1, 2}.

Benchmarking on (``TSPIN_BENCH=1``): the ``cpu`` config on the CPU (sdpa), the ``gpu`` config on CUDA (sdpa and
flex_attention). One record per (attention, r): each timed round runs one step of every layout, interleaved, so
the layouts share the machine's load as it moves. A record's ``layouts`` holds per layout the median step time,
the backbone tokens and their ratio to packed, and the peak memory (CUDA peak allocated, or the CPU's peak RSS
rise of one step in a fresh process); ``speedup_vs_packed`` / ``speedup_vs_padded`` are medians of the paired
per-round ratios; the 1/5/15-minute load average before and after is kept. ``TSPIN_LAYOUT_ROUNDS`` (default 5)
sets the rounds. Benchmarking off (CI): the ``toy`` config, one round, and a check that the three layouts
compute the same loss and gradients.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from benchmarks import common
from benchmarks import shared_prefix as sp

ROUNDS = int(os.environ.get("TSPIN_LAYOUT_ROUNDS", "5"))
_RUNNERS: dict = {}


def _runner(cfg, attn, device) -> sp.Runner:
    key = (cfg.name, attn, device)
    if key not in _RUNNERS:
        _RUNNERS.clear()  # one model alive at a time
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        _RUNNERS[key] = sp.Runner(cfg, device, dtype, attn)
    return _RUNNERS[key]


@pytest.fixture(autouse=True, scope="module")
def _release():
    yield
    _RUNNERS.clear()


def test_layouts_compute_the_same_step():
    """The benchmark's three layouts: one loss and one gradient on the same weights (toy config, float32)."""
    runner = sp.Runner(sp.CONFIGS["toy"], "cpu", torch.float32)
    batches = runner.batches(1.0)
    out = {}
    for layout in sp.LAYOUTS:
        runner.model.zero_grad(set_to_none=True)
        loss = runner.loss(batches[layout])
        loss.backward()
        out[layout] = (loss.detach(), {n: p.grad.clone() for n, p in runner.model.named_parameters()})
    ref_loss, ref_g = out["padded"]
    for layout in ("packed", "shared_prefix"):
        loss, g = out[layout]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for n in ref_g:
            torch.testing.assert_close(g[n], ref_g[n], rtol=1e-4, atol=1e-4 * ref_g[n].abs().max().item() + 1e-8)
    tokens = {layout: b["tokens"] for layout, b in batches.items()}
    assert tokens["shared_prefix"] / tokens["packed"] == pytest.approx(sp.token_ratio(1.0))
    assert tokens["padded"] == tokens["packed"]  # uniform lengths: no padding


@pytest.mark.parametrize("r", sp.RATIOS)
def test_layout_step_cpu(benchmark, r):
    _layout_step(benchmark, sp.CONFIGS["toy" if benchmark.disabled else "cpu"], "sdpa", r, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("r", sp.RATIOS)
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_layout_step_gpu(benchmark, attn, r):
    _layout_step(benchmark, sp.CONFIGS["gpu"], attn, r, "cuda")


def _layout_step(benchmark, cfg, attn, r, device):
    """One benchmark round = one step of each layout, in an order rotated round by round; the record holds each
    layout's median step time and the median over rounds of the paired ratios (shared-prefix vs packed/padded
    within the same round, so a load change between rounds cancels)."""
    benchmark.group = f"layouts-{cfg.name}-{attn}"
    runner = _runner(cfg, attn, device)
    batches = runner.batches(r)
    times = {layout: [] for layout in sp.LAYOUTS}
    n = [0]

    def one_round():
        k = n[0] % len(sp.LAYOUTS)
        for layout in sp.LAYOUTS[k:] + sp.LAYOUTS[:k]:
            t0 = time.perf_counter()
            runner.step(batches[layout])
            times[layout].append(time.perf_counter() - t0)
        n[0] += 1

    load_before = os.getloadavg()
    one_round()  # warm-up (allocator, kernels)
    times = {layout: [] for layout in sp.LAYOUTS}
    benchmark.pedantic(one_round, rounds=1 if benchmark.disabled else ROUNDS, warmup_rounds=0)
    tokens = {k: v["tokens"] for k, v in batches.items()}
    P = sp.prompt_length(cfg, r)
    assert tokens["shared_prefix"] / tokens["packed"] == pytest.approx((P + 3 * cfg.L) / (3 * P + 3 * cfg.L))
    layouts = {}
    for layout in sp.LAYOUTS:
        if device == "cuda":
            peak, kind = sp.cuda_peak(runner, batches[layout]), "CUDA peak allocated during one step"
        elif not benchmark.disabled:
            peak = sp.rss_rise_in_subprocess(cfg.name, layout, r, attn)["peak_rss_rise_bytes"]
            kind = "host peak RSS rise of one step (fresh subprocess)"
        else:
            peak, kind = None, None
        layouts[layout] = dict(step_seconds=statistics.median(times[layout]), step_seconds_all=times[layout],
                               backbone_tokens=tokens[layout], tokens_vs_packed=tokens[layout] / tokens["packed"],
                               peak_mem_bytes=peak, memory_kind=kind)
    paired = lambda base: statistics.median(b / s for b, s in zip(times[base], times["shared_prefix"]))  # noqa: E731
    common.record(
        benchmark, runner.device, impl="layouts", shape=f"layouts-{cfg.name}-r{r}", mode="layout_step",
        head="trainable", attn=attn, r=r, P=P, L=cfg.L, B=cfg.B, model=cfg.model,
        config=cfg.name, rounds=len(times["packed"]), layouts=layouts, token_ratio_formula=sp.token_ratio(P / cfg.L),
        speedup_vs_packed=paired("packed"), speedup_vs_padded=paired("padded"),
        peak_mem_bytes=layouts["shared_prefix"]["peak_mem_bytes"],
        load_avg_before=list(load_before), load_avg_after=list(os.getloadavg()))


def test_train_layouts_data_has_the_intended_lengths(tmp_path):
    """benchmarks.train_layouts: after the template, BOS and EOS, prompts have P tokens and every response L (the
    equal mix), or lengths spread 4x around those (the vary mix); the shared part of each triplet is the prompt."""
    from benchmarks import train_layouts as tl
    from tspin.config import load_config
    from tspin.data import build_features, load_records
    from tspin.models import load_tokenizer
    from tspin_kernels.integrations import build_shared_prefix_batch

    def batch_of(setup):
        cfg = load_config(str(setup["recipe"]), {})
        feats = build_features(load_records(cfg.data_path), load_tokenizer(cfg.model_name_or_path),
                               ("real", "generated", "proto"), template=cfg.prompt_template,
                               max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        return build_shared_prefix_batch([[f[k] for k in ("real", "generated", "proto")] for f in feats])

    b = batch_of(tl.build_run_dir(tmp_path, L=10, r=2.0, n=3, batch=2, model=tl.TOY))
    assert b.prefix_lengths == (20,) * 3 and b.response_lengths == ((10, 10, 10),) * 3
    setup = tl.build_run_dir(tmp_path, L=20, r=1.0, n=40, batch=2, model=tl.TOY, mix="vary")
    b = batch_of(setup)
    responses = [n for r in b.response_lengths for n in r]
    assert min(b.prefix_lengths) >= 8 and max(b.prefix_lengths) <= 32 and min(responses) >= 8 and max(responses) <= 32
    assert max(responses) / min(responses) > 3 and max(b.prefix_lengths) / min(b.prefix_lengths) > 3
    assert setup["tokens"] == sum(b.prefix_lengths) * 3 + sum(responses)


@pytest.mark.slow
def test_train_layouts_runs_the_cli(tmp_path):
    """The real `tspin train` per layout (toy model): every layout logs the same first loss, and the attention
    `auto` chose for it."""
    from benchmarks import train_layouts as tl

    setup = tl.build_run_dir(tmp_path, L=8, r=1.0, n=4, batch=2, model=tl.TOY)
    res = tl.measure(tmp_path, {"equal": setup}, rounds=1)["equal"]
    for layout, attn in (("padded", "sdpa"), ("packed", "varlen_sdpa"), ("shared_prefix", "varlen_sdpa")):
        assert res[layout]["first_loss"] == pytest.approx(res["padded"]["first_loss"], rel=1e-5)
        assert res[layout]["steps"] == 2 and res[layout]["attn_implementation"] == attn
    assert "speedup_vs_padded_cpu_seconds" in res["shared_prefix"] and "equal/packed" in tl.goals({"equal": res})
