"""Host-memory benchmark of the TRL integration: one DPO training step at a 128K vocabulary, TRL's own DPOTrainer
vs FusedDPOTrainer (with and without TRL's logit metrics), each in a fresh subprocess (benchmarks.trl_rss_probe).

The default run (CI) uses one pair of 256 tokens; the README's table is the slow one, two pairs of 1024 tokens
(``--runslow``). Checks before anything is recorded: the fused trainers' loss and gradient norm equal TRL's, and
the fused step's peak RSS rise is at most half of TRL's.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

from benchmarks import common

pytest.importorskip("trl", reason="TRL is not installed (pip install 'tspin[trl]')")

VOCAB, HIDDEN, LAYERS = 128256, 64, 2
SHAPES = {"ci": (1, 256), "full": (2, 1024)}  # (pairs, tokens per sequence)
BOUND = 0.5
# A fixed mmap threshold turns off glibc's dynamic one, under which a freed large block can raise the threshold and
# later blocks then come from (and stay in) the heap: which ones depends on the order of allocations, which made
# the rise wobble by tens of MiB between trainers. Fixed, every large block is mapped and unmapped, and the peak RSS
# follows the live memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


@functools.cache
def probe(trainer: str, size: str) -> dict:
    pairs, length = SHAPES[size]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **MALLOC_ENV}
    env.pop("TRITON_INTERPRET", None)  # CPU: the chunked torch path, no Triton
    cmd = [sys.executable, "-m", "benchmarks.trl_rss_probe", "--trainer", trainer, "--vocab", str(VOCAB),
           "--hidden", str(HIDDEN), "--layers", str(LAYERS), "--pairs", str(pairs), "--length", str(length)]
    out = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_and_record(benchmark, trainer: str, size: str) -> None:
    benchmark.group = f"trl-rss-{size}"
    res = benchmark.pedantic(probe, args=(trainer, size), rounds=1, iterations=1)
    trl_res = probe("trl", size)
    if trainer != "trl":
        assert abs(res["loss"] - trl_res["loss"]) <= 1e-5, (res["loss"], trl_res["loss"])
        assert abs(res["grad_norm"] - trl_res["grad_norm"]) <= 1e-4 * trl_res["grad_norm"], (res, trl_res)
        assert res["rise_bytes"] <= BOUND * trl_res["rise_bytes"], (
            f"{trainer}: peak RSS rise {res['rise_bytes'] / 2**20:.0f} MiB > {BOUND:.0%} of TRL's "
            f"{trl_res['rise_bytes'] / 2**20:.0f} MiB")
    pairs, length = SHAPES[size]
    shape = f"trl-dpo-V{VOCAB}-D{HIDDEN}-L{LAYERS}-P{pairs}-T{length}"
    keep = ("baseline_rss", "peak_rss", "method", "loss", "grad_norm", "tokens", "completion_tokens", "trl")
    common.record(benchmark, "cpu", impl=f"dpo-{trainer}", shape=shape, mode="dpo_step", head="trainable",
                  peak_mem_bytes=res["rise_bytes"], memory_kind="host RSS rise (fresh subprocess)",
                  step_seconds=res["seconds"], malloc_env=MALLOC_ENV,
                  rise_ratio_vs_trl=res["rise_bytes"] / max(1, trl_res["rise_bytes"]),
                  **{k: res[k] for k in keep})


@pytest.mark.parametrize("trainer", ["trl", "fused"])
def test_dpo_step_rss(benchmark, trainer):
    _check_and_record(benchmark, trainer, "ci")


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["trl", "fused", "fused-no-logit-metrics"])
def test_dpo_step_rss_full(benchmark, trainer):
    _check_and_record(benchmark, trainer, "full")
