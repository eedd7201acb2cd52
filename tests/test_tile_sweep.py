"""Tile overrides (``tiles=`` of the API and the launchers) and the sweep that finds them, on CPU."""

import pytest
import torch

from benchmarks import common, tile_sweep
from tests._oracle import spy
from tests.test_sequence_logps import CASES, check_against_oracle
from tspin_kernels import _options
from tspin_kernels.kernels import fused_logps


def test_tiles_reach_the_launchers_and_stay_exact(monkeypatch):
    seen = []
    real = fused_logps._config
    spy(monkeypatch, fused_logps, "_config", lambda dev, dt, kernel, tiles=None: seen.append((kernel, tiles)))
    check_against_oracle(CASES["odd"], "triton", torch.bfloat16, tiles={"bwd": "32,64,16,4,1"})
    bwd = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=1)
    assert ("fwd", None) in seen and ("bwd", bwd) in seen  # the forward keeps the built-in tiles
    assert real(torch.device("cpu"), torch.float32, "bwd", bwd) == bwd
    seen.clear()
    check_against_oracle(CASES["odd"], "triton", torch.float32, backward="matmul",
                         tiles={"fwd": [64, 32, 16, 4, 1], "bwd": bwd})
    assert seen == [("fwd", dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)), ("bwd", bwd)]


@pytest.mark.parametrize("raw", ["64,128,64,8", "48,128,64,8,3", "64,128,64,3,3", "64,128,64,8,0", "a,b,c,d,e",
                                 (64, 128, 64, 8), dict(BLOCK_M=64, BLOCK_N=128)])
def test_bad_tiles_name_the_argument(raw):
    from tspin_kernels import sequence_logps

    h, w, lab = torch.randn(3, 4, 8), torch.randn(40, 8), torch.randint(0, 40, (3, 4))
    with pytest.raises(ValueError, match=r"tiles\['fwd'\] must be 'BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages'"):
        sequence_logps(h, w, lab, impl="triton", tiles={"fwd": raw})


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
    assert _options.parse_tiles("128,256,64,8,3", "x") == dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8,
                                                              num_stages=3)
