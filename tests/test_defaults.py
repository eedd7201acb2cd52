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
from tspin_kernels import LossPath, _defaults, _device, functions, reference, sequence_logps
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


# ----------------------------------------------------------------------------- the default path per device type
def test_builtin_path_per_device_type():
    """The defaults the measurements chose (tspin_kernels/_defaults.py, benchmarks/results/h200-20261204-*):
    on CUDA the Triton fused loss path, and the matmul backward where log-probs have their own backward; on the
    CPU the torch path, fused. Pinned here for both device types, on a machine without a GPU."""
    cuda, cpu = _defaults.builtin_path("cuda"), _defaults.builtin_path("cpu")
    assert cuda == LossPath(impl="triton", fused=True, backward="matmul", grad_filter_eps=0.0, chunk_elements=2**28)
    assert cpu == LossPath(impl="torch", fused=True, backward="atomic", grad_filter_eps=0.0, chunk_elements=2**28)
    assert _defaults.builtin_path("cuda", triton=False).impl == "torch"  # no Triton: the torch path, fused
    assert _defaults.builtin_path("mps").impl == "torch"
    # the recompute torch path's chunk: 65 rows at V=128k was 7x slower on the GPU; 32 MiB stays on the CPU
    assert _defaults.resolve_path("cuda", impl="torch", fused=False).chunk_elements == 2**28
    assert _defaults.resolve_path("cpu", impl="torch", fused=False).chunk_elements == 2**23
    # Triton's CPU interpreter (tests, debugging) keeps the recompute path its kernels are checked on
    assert _defaults.builtin_path("cpu", "triton") == LossPath("triton", False, "atomic", 0.0, 2**23)
    assert _defaults.builtin_path("cuda", "reference").fused is False


def test_resolution_keyword_then_variable_then_builtin(monkeypatch):
    resolve = _defaults.resolve_path
    assert resolve("cuda") == _defaults.builtin_path("cuda")
    monkeypatch.setenv("TSPIN_FUSED", "0")
    assert resolve("cuda").fused is False and resolve("cuda", fused=True).fused is True
    monkeypatch.setenv("TSPIN_BACKWARD", "atomic")
    assert resolve("cuda").backward == "atomic" and resolve("cuda", backward="matmul").backward == "matmul"
    monkeypatch.delenv("TSPIN_FUSED")
    monkeypatch.delenv("TSPIN_BACKWARD")
    # an option only the recompute path has, by keyword: that path; by variable: only that option's default
    assert resolve("cuda", backward="atomic") == LossPath("triton", False, "atomic", 0.0, 2**28)
    assert resolve("cuda", grad_filter_eps=1e-3).fused is False
    assert resolve("cuda", backward="atomic", fused=True).fused is True  # fused by keyword wins
    monkeypatch.setenv("TSPIN_GRAD_FILTER", "1e-3")
    assert resolve("cuda") == LossPath("triton", True, "atomic", 1e-3, 2**28)  # the filter needs atomic
    with pytest.raises(ValueError, match="grad_filter_eps: skips tiles of the atomic backward only"):
        resolve("cuda", backward="matmul")
    monkeypatch.delenv("TSPIN_GRAD_FILTER")
    monkeypatch.setenv("TSPIN_IMPL", "torch")
    assert resolve("cuda").impl == "torch" and resolve("cuda", impl="triton").impl == "triton"
    monkeypatch.setenv("TSPIN_CHUNK_ELEMENTS", "4096")
    assert resolve("cuda").chunk_elements == 4096 and resolve("cuda", chunk_elements=8).chunk_elements == 8
    with pytest.raises(ValueError, match="fused: impl='reference' is the full-logits oracle"):
        resolve("cpu", impl="reference", fused=True)
    with pytest.raises(TypeError, match="fused: expected None, True or False"):
        resolve("cpu", fused="yes")


def test_calls_take_the_resolved_path(monkeypatch):
    """What loss_path says is what the calls run: the fused path (its Function), or log-probs with their own
    backward and the chosen Triton backward."""
    from tspin_kernels import fused_loss, loss_path, tspin_loss

    h, w, lab = _inputs()
    ran = []
    spy(monkeypatch, fused_loss.FusedTupleLoss, "apply", lambda *a: ran.append("fused"))
    for name in ("logps_backward", "logps_backward_matmul"):
        spy(monkeypatch, functions, name, lambda *a, _n=name, **k: ran.append(_n))
    for kw in (dict(), dict(impl="triton"), dict(impl="triton", backward="matmul"), dict(fused=False)):
        ran.clear()
        tspin_loss(h, w, lab, **kw).loss.backward()
        path = loss_path(h, **kw)
        want = ["fused"] if path.fused else [{"atomic": "logps_backward", "matmul": "logps_backward_matmul"}
                                             [path.backward]] if path.impl == "triton" else []
        assert ran == want, (kw, path, ran)
    assert loss_path("cpu") == loss_path(h)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        monkeypatch.setattr(_device, "interpreting", lambda: False)
        loss_path("cpu", impl="triton")


def test_loss_options_are_sequence_logps_keywords():
    import inspect

    from tspin_kernels import functional

    params = inspect.signature(sequence_logps).parameters
    assert functional._OPTIONS == {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    h, w, lab = _inputs()
    with pytest.raises(TypeError, match="chunk: not an option of the losses"):
        tspin_kernels.tspin_loss(h, w, lab, chunk=3)
