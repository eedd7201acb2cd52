"""The GPU tile configs, compiled here for sm_80/86/90/100/120 without a GPU: each fits its shared memory, never
spills, uses its generation's tensor cores and adds gradients with plain reductions.

A config over the limit fails at launch ("out of resources") on that GPU only; CI has none, so this is where it is
caught (the float32 backward on H100 once needed 240 KiB of the 227 KiB there).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import kernel_resources as kr
from tspin_kernels import _device
from tspin_kernels.kernels.fused_logps import tile_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("kr") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    return proc, json.loads(out.read_text())["records"] if out.exists() else []


def test_every_config_compiles_fits_and_does_not_spill(compiled):
    proc, records = compiled
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = {name for name, *_ in kr._variants(torch.bfloat16) + kr._epilogue_variants(torch.bfloat16)}
    assert {(r["arch"], r["dtype"], r["kernel"]) for r in records} == {
        (f"sm_{a}", d, k) for a in kr.ARCHS for d in kr.DTYPES for k in kernels}
    for r in records:
        assert (0 if r["kernel"].startswith("fused loss") else 1) <= r["shared_bytes"] <= r["shared_limit"], r
        assert r["local_bytes"] == 0 and 0 < r["registers"] <= 255, r
        # the backward sums gradients with fire-and-forget REDs: no ATOM round trips, GPU-wide MEMBARs or L1
        # invalidates (what Triton's default acq_rel atomic_add compiles to)
        assert bool(r["atomics"]) == r["kernel"].startswith("backward"), r
        assert all(a.startswith(("RED.E.ADD.F32", "REDG.E.ADD.F32")) for a in r["atomics"]), r
        assert r["barriers"] == [], r


def test_every_gpu_generation_uses_its_tensor_cores(compiled):
    _, records = compiled
    expected = {"sm_80": "mma.sync", "sm_86": "mma.sync", "sm_90": "wgmma", "sm_100": "tcgen05", "sm_120": "mma.sync"}
    assert {r["arch"] for r in records} == set(expected)
    for r in records:  # the fused loss path's epilogues do row work only (their products are cuBLAS)
        assert r["mma"] == ("none" if r["kernel"].startswith("fused loss") else expected[r["arch"]]), r


def test_problems_names_the_kernel_and_the_limit():
    rec = dict(arch="sm_90", dtype="float32", kernel="backward", config="64x128x64 w8 s3", shared_bytes=245760,
               shared_limit=232448, local_bytes=16, registers=255, mma="wgmma")
    msgs = kr.problems([rec])
    assert len(msgs) == 2
    assert "sm_90 float32 backward" in msgs[0] and "245760" in msgs[0] and "232448" in msgs[0]
    assert "spills 16 B" in msgs[1]
    assert kr.problems([dict(rec, shared_bytes=1024, local_bytes=0)]) == []
    ordered = kr.problems([dict(rec, shared_bytes=1024, local_bytes=0, atomics=["ATOMG.E.ADD.F32"],
                                barriers=["MEMBAR.ALL.GPU"])])
    assert len(ordered) == 1 and "ATOMG.E.ADD.F32" in ordered[0] and "MEMBAR.ALL.GPU" in ordered[0]


def test_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--arch", "90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr


def test_shared_memory_limits_and_tile_classes():
    assert _device.shared_memory_limit((9, 0)) == 232448
    assert _device.shared_memory_limit((8, 0)) == 166912
    assert _device.shared_memory_limit((8, 9)) == 101376
    assert _device.shared_memory_limit((8, 7)) == 166912
    assert _device.shared_memory_limit((11, 0)) == 101376  # unknown newer part: the conservative class
    assert _device.shared_memory_limit((7, 2)) == 65536
    # float32 takes shallower K tiles than 16-bit where shared memory is tight
    assert tile_config((9, 0), torch.float32, 232448)["BLOCK_K"] < tile_config((9, 0), torch.bfloat16, 232448)[
        "BLOCK_K"]
    assert tile_config((8, 6), torch.float32, 101376)["BLOCK_K"] == 16
    # a Hopper part reporting little shared memory gets the small-GPU tiles, not the H100 ones
    assert tile_config((9, 0), torch.bfloat16, 101376) == tile_config((8, 6), torch.bfloat16, 101376)
