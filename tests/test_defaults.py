"""Kernel options are keyword arguments; environment variables only set their defaults, in one module.

Each option: the variable changes what a call that leaves the option unset does, an explicit keyword wins over
the variable, and a malformed variable raises an error naming it. Spies on the launchers say which path ran.
"""

import re
from pathlib import Path

import pytest
import torch

import tspin_kernels
from tests._oracle import make_inputs, spy
from tspin_kernels import functions, reference, sequence_logps
from tspin_kernels.kernels import fused_logps


def _inputs():
    inp = make_inputs(3, 6, 16, 40, torch.float32)
    inp["hidden"].requires_grad_()
    return inp["hidden"], inp["weight"], inp["labels"]


def _backward_used(monkeypatch, **options) -> str:
    used = []
    for name in ("logps_backward", "logps_backward_matmul"):
        spy(monkeypatch, functions, name, lambda *a, _n=name, **k: used.append(_n))
    h, w, lab = _inputs()
    sequence_logps(h, w, lab, impl="triton", **options).sum().backward()
    return {"logps_backward": "atomic", "logps_backward_matmul": "matmul"}[used[0]]


def test_backward_default_from_env_and_keyword_wins(monkeypatch):
    assert _backward_used(monkeypatch) == "atomic"
    monkeypatch.setenv("TSPIN_BACKWARD", "matmul")
    assert _backward_used(monkeypatch) == "matmul"
    assert _backward_used(monkeypatch, backward="atomic") == "atomic"
    monkeypatch.setenv("TSPIN_BACKWARD", "fast")
    with pytest.raises(ValueError, match="TSPIN_BACKWARD: expected one of"):
        _backward_used(monkeypatch)
    assert _backward_used(monkeypatch, backward="matmul") == "matmul"  # an explicit option never reads it


def test_grad_filter_default_from_env(monkeypatch):
    seen = []
    spy(monkeypatch, functions, "logps_backward", lambda *a, **k: seen.append(k["filter_eps"]))
    h, w, lab = _inputs()
    monkeypatch.setenv("TSPIN_GRAD_FILTER", "1e-3")
    sequence_logps(h, w, lab, impl="triton").sum().backward()
    sequence_logps(h, w, lab, impl="triton", grad_filter_eps=0.0).sum().backward()
    assert seen == [1e-3, 0.0]
    monkeypatch.setenv("TSPIN_GRAD_FILTER", "lots")
    with pytest.raises(ValueError, match="TSPIN_GRAD_FILTER: expected a float"):
        sequence_logps(h, w, lab, impl="triton")


def test_tiles_default_from_env(monkeypatch):
    seen = []
    spy(monkeypatch, fused_logps, "_config", lambda d, t, kernel, tiles=None: seen.append((kernel, tiles)))
    h, w, lab = _inputs()
    monkeypatch.setenv("TSPIN_TILES_BWD", "32,64,16,4,1")
    sequence_logps(h, w, lab, impl="triton", tiles={"fwd": "32,32,16,4,1"}).sum().backward()
    env_bwd = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=1)
    assert seen == [("fwd", dict(env_bwd, BLOCK_N=32)), ("bwd", env_bwd)]
    monkeypatch.setenv("TSPIN_TILES_FWD", "64,128,64,8")
    with pytest.raises(ValueError, match="TSPIN_TILES_FWD must be 'BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages'"):
        sequence_logps(h, w, lab, impl="triton")


def test_chunk_elements_default_from_env(monkeypatch):
    rows = []
    spy(monkeypatch, reference, "_chunk_logits", lambda h, *a: rows.append(h.shape[0]))
    h, w, lab = _inputs()
    ref = sequence_logps(h, w, lab, impl="reference")
    monkeypatch.setenv("TSPIN_CHUNK_ELEMENTS", str(3 * 40))  # V=40: three rows per chunk
    torch.testing.assert_close(sequence_logps(h, w, lab, impl="torch"), ref)
    assert max(rows) == 3 and len(rows) > 1
    rows.clear()
    sequence_logps(h, w, lab, impl="torch", chunk_elements=2 * 40)
    assert max(rows) == 2
    monkeypatch.setenv("TSPIN_CHUNK_ELEMENTS", "32MiB")
    with pytest.raises(ValueError, match="TSPIN_CHUNK_ELEMENTS: expected a positive int"):
        sequence_logps(h, w, lab, impl="torch")


def test_impl_default_from_env(monkeypatch):
    h, w, lab = _inputs()
    monkeypatch.setenv("TSPIN_IMPL", "reference")
    out = sequence_logps(h, w, lab)
    assert out.grad_fn is not None and "Chunked" not in type(out.grad_fn).__name__
    assert "Chunked" in type(sequence_logps(h, w, lab, impl="torch").grad_fn).__name__
    monkeypatch.setenv("TSPIN_IMPL", "nonsense")
    with pytest.raises(ValueError, match="TSPIN_IMPL: expected one of"):
        sequence_logps(h, w, lab)


def test_only_the_defaults_module_reads_the_environment():
    """The library's one documented place for environment variables (Triton's own switch aside)."""
    pkg = Path(tspin_kernels.__file__).parent
    readers = {}
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        hits = re.findall(r"\benviron\b|\bgetenv\b", text)
        if hits:
            readers[path.relative_to(pkg).as_posix()] = sorted(set(hits))
    assert readers.pop("_defaults.py")
    assert readers == {"_device.py": ["environ"]}, readers  # TRITON_INTERPRET, Triton's own
    assert "TRITON_INTERPRET" in (pkg / "_device.py").read_text()
