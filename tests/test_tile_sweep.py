"""Tile overrides (TSPIN_TILES_FWD/BWD, the launchers' ``tiles=``) and the sweep that finds them, on CPU."""

import pytest
import torch

from benchmarks import common, tile_sweep
from tests.test_sequence_logps import CASES, check_against_oracle
from tspin_kernels import _device
from tspin_kernels.kernels import fused_logps


def test_env_override_reaches_the_launcher_and_stays_exact(monkeypatch):
    monkeypatch.setenv("TSPIN_TILES_BWD", "32,64,16,4,1")
    cpu = torch.device("cpu")
    assert fused_logps._config(cpu, torch.float32, "bwd") == dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4,
                                                                  num_stages=1)
    assert fused_logps._config(cpu, torch.float32, "fwd")["BLOCK_M"] == 16  # the forward keeps its own
    monkeypatch.setenv("TSPIN_TILES_FWD", "64,32,16,4,1")
    check_against_oracle(CASES["odd"], "triton", torch.bfloat16)


@pytest.mark.parametrize("raw", ["64,128,64,8", "48,128,64,8,3", "64,128,64,3,3", "64,128,64,8,0", "a,b,c,d,e"])
def test_bad_override_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("TSPIN_TILES_FWD", raw)
    with pytest.raises(ValueError, match="TSPIN_TILES_FWD must be 'BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages'"):
        fused_logps._config(torch.device("cpu"), torch.float32, "fwd")


def test_sweep_checks_and_times_every_candidate():
    shape = common.Shape("sweep-test", 24, 200, 1, 16)
    cands = ["16,32,32,4,1", "32,64,16,4,1"]
    kernels = ["fwd", "bwd", "bwd_mm"]
    records = tile_sweep.sweep(shape, kernels, cands, torch.device("cpu"), torch.float32, reps=1)
    assert [(r["kernel"], r["tiles"]) for r in records] == [(k, c) for k in kernels for c in cands]
    for r in records:
        assert r["correct"] and r["seconds"] > 0 and "error" not in r, r
    assert [r["default"] for r in records] == [True, False] * 3  # the interpreter's built-in tiles
    assert tile_sweep.best(records, "bwd")["tiles"] in cands


def test_best_ignores_wrong_and_failed_candidates():
    recs = [dict(kernel="fwd", tiles="a", correct=False, seconds=0.1),
            dict(kernel="fwd", tiles="b", correct=True, seconds=0.3),
            dict(kernel="fwd", tiles="c", correct=False, error="OutOfResources"),
            dict(kernel="fwd", tiles="d", correct=True, seconds=0.2)]
    assert tile_sweep.best(recs, "fwd")["tiles"] == "d"
    assert tile_sweep.best(recs, "bwd") is None


def test_sweep_rejects_a_bad_candidate(capsys):
    with pytest.raises(SystemExit) as e:
        tile_sweep.main(["--tiles", "64,100,64,8,3"])
    assert e.value.code == 2 and "--tiles must be" in capsys.readouterr().err


def test_parse_tiles_roundtrip():
    assert _device.parse_tiles("128,256,64,8,3", "x") == dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8,
                                                              num_stages=3)
