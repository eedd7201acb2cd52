"""Host-memory benchmark (issue 2, item 7): the chunked torch fallback vs the full-logits reference on CPU.

``sequence_logps`` forward+backward at R=8, T=1024, D=256, V=50000 (float32, half of each row ignored,
trainable head). Each impl runs in a fresh subprocess (``benchmarks.rss_probe``) and reports its peak RSS rise
over the inputs. Goal: ``impl="torch"`` rises by at most 15% of what ``impl="reference"`` does.
The records go to the results JSON like every other benchmark (``peak_mem_bytes`` = the RSS rise).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

from benchmarks import common

ROWS, T, D, V = 8, 1024, 256, 50000
BOUND = 0.15


@functools.cache
def probe(impl: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # neither impl uses Triton; keep the child's import light
    cmd = [sys.executable, "-m", "benchmarks.rss_probe", "--impl", impl,
           "--rows", str(ROWS), "--T", str(T), "--D", str(D), "--V", str(V)]
    out = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_rss_rise(benchmark, impl):
    benchmark.group = "rss-cpu"
    res = benchmark.pedantic(probe, args=(impl,), rounds=1, iterations=1)
    counted = ROWS * (T - T // 2)
    info = {"impl": impl, "shape": f"rss-R{ROWS}-T{T}-D{D}-V{V}", "mode": "fwd_bwd", "head": "trainable",
            "peak_mem_bytes": res["rise_bytes"], "tflops": 3 * 2.0 * counted * D * V / res["seconds"] / 1e12,
            "memory_kind": "host RSS rise (fresh subprocess)", "step_seconds": res["seconds"],
            "baseline_rss": res["baseline_rss"], "peak_rss": res["peak_rss"], "method": res["method"]}
    if impl == "torch":
        info["rise_ratio_vs_reference"] = res["rise_bytes"] / max(1, probe("reference")["rise_bytes"])
    common.record(benchmark, "cpu", **info)


def test_torch_rss_within_bound():
    ref, ours = probe("reference")["rise_bytes"], probe("torch")["rise_bytes"]
    assert ref > 0
    assert ours <= BOUND * ref, (
        f"impl='torch' peak RSS rise {ours / 2**20:.0f} MiB > {BOUND:.0%} of impl='reference' {ref / 2**20:.0f} MiB"
    )
