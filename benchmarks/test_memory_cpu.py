"""Host-memory benchmark (issue 2, item 7): the chunked torch fallback vs the full-logits reference on CPU.

``sequence_logps`` forward+backward at R=8, T=1024, D=256, V=50000 (float32, half of each row ignored,
trainable head). Each impl runs in a fresh subprocess (``benchmarks.rss_probe``) and reports its peak RSS rise
over the inputs. Goal: ``impl="torch"`` rises by at most 15% of what ``impl="reference"`` does. The same bound
holds for the fused loss path (``tspin_loss(impl="torch")``, issue 17) against the naive loss, with 6 rows.
The records go to the results JSON like every other benchmark (``peak_mem_bytes`` = the RSS rise).
"""

from __future__ import annotations

import functools

import pytest

from benchmarks import common, rss_probe

ROWS, T, D, V = 8, 1024, 256, 50000
LOSS_ROWS = 6
BOUND = 0.15


@functools.cache
def probe(impl: str) -> dict:
    return rss_probe.in_fresh_process("--impl", impl, "--rows", str(ROWS), "--T", str(T), "--D", str(D),
                                      "--V", str(V), timeout=900)


@functools.cache
def probe_loss(peer: str) -> dict:
    """The T-SPIN loss of a benchmark peer at the same shape with 3B = 6 rows (``tspin_loss`` takes triplets)."""
    return rss_probe.in_fresh_process("--peer", peer, "--rows", str(LOSS_ROWS), "--T", str(T), "--D", str(D),
                                      "--V", str(V), timeout=900)


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


def test_fused_loss_rss_within_bound(benchmark):
    """The fused loss path (``tspin_loss(impl="torch")``, whole triplets per chunk) against the naive full-logits
    loss at the same shape: also at most 15%."""
    benchmark.group = "rss-cpu"
    res = benchmark.pedantic(probe_loss, args=("torch",), rounds=1, iterations=1)
    naive = probe_loss("naive")["rise_bytes"]
    counted = LOSS_ROWS * (T - T // 2)
    common.record(benchmark, "cpu", impl="torch", shape=f"rss-loss-R{LOSS_ROWS}-T{T}-D{D}-V{V}", mode="fwd_bwd",
                  head="trainable", peak_mem_bytes=res["rise_bytes"], memory_kind="host RSS rise (fresh subprocess)",
                  tflops=3 * 2.0 * counted * D * V / res["seconds"] / 1e12, step_seconds=res["seconds"],
                  baseline_rss=res["baseline_rss"], peak_rss=res["peak_rss"], method=res["method"],
                  naive_rise_bytes=naive, rise_ratio_vs_reference=res["rise_bytes"] / max(1, naive))
    assert naive > 0
    assert res["rise_bytes"] <= BOUND * naive, (
        f"fused tspin_loss peak RSS rise {res['rise_bytes'] / 2**20:.0f} MiB > {BOUND:.0%} of the naive loss's "
        f"{naive / 2**20:.0f} MiB")
