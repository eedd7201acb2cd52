"""Kernel benchmarks: T-SPIN loss (and gradients) from hidden states + LM head, ours vs the peers.

GPU (``-m gpu``): the three benchmark shapes of docs/contract.md in bf16. CPU: one tiny float32 shape (CI runs it
with benchmarking disabled, so every peer that can run on CPU is still executed and checked). Every peer is checked
against ``impl="reference"`` (loss and gradients) before it is timed.

Modes: ``forward`` (training forward, graph kept), ``backward`` (backward only; the forward runs untimed in setup)
and ``fwd_bwd``. Heads: ``trainable`` (grad of W) and ``frozen`` (``W.requires_grad=False``, e.g. LoRA).

``default`` is the library's plain call (``tspin_loss(hidden, weight, labels)``, no options): its record names the
path the defaults resolved to on this device (``loss_path``, and ``same_as``: the named peer it equals). Peak
memory is the rise over the inputs alone (an earlier case's gradients are freed before the baseline).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from benchmarks import common, peers

IMPLS = tuple(peers.PEERS)
MODES = ("forward", "backward", "fwd_bwd")
HEADS = ("trainable", "frozen")
# pedantic settings: (rounds, warmup_rounds); TSPIN_BENCH_ROUNDS overrides the rounds (short GPU sessions)
_R = int(os.environ.get("TSPIN_BENCH_ROUNDS", "0"))
ROUNDS = {"cuda": (_R or 10, 2), "cpu": (_R or 3, 1)}


@functools.cache
def _verified(impl: str, shape: common.Shape, device: str, dtype: torch.dtype, head: str):
    """Check once per (impl, shape, head) against the reference: (error message or None, relative errors)."""
    h, w, lab = common.make_inputs(shape, device, dtype, head == "trainable", seed=1)
    try:
        return peers.verify(impl, h, w, lab, head == "trainable")
    finally:
        del h, w, lab
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


_INPUTS: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _release_inputs():
    yield
    _INPUTS.clear()


def _inputs(shape: common.Shape, device: str, dtype: torch.dtype, trainable: bool):
    """The timed inputs, shared by consecutive cases of one shape (one set alive at a time: they are large)."""
    key = (shape, device, dtype)
    if _INPUTS.get("key") != key:
        _INPUTS.clear()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        _INPUTS.update(key=key, tensors=common.make_inputs(shape, device, dtype, True))
    hidden, weight, labels = _INPUTS["tensors"]
    common.clear_grads(hidden, weight)
    weight.requires_grad_(trainable)
    return hidden, weight, labels


def _steps(fn, hidden, weight, labels, head_trainable, mode, device):
    """(prepare, run) for one mode: ``prepare`` is untimed (clears grads; runs the forward for ``backward``)."""

    def prepare():
        common.clear_grads(hidden, weight)
        if mode == "backward":
            return fn(hidden, weight, labels, head_trainable)
        return None

    def run(state):
        if mode == "backward":
            state.backward()
            out = None
        else:
            out = fn(hidden, weight, labels, head_trainable)
            if mode == "fwd_bwd":
                out.backward()
                out = None
        common.sync(device)
        return out

    return prepare, run


def run_case(benchmark, shape: common.Shape, impl: str, mode: str, head: str, device: str, dtype: torch.dtype):
    reason = peers.unavailable(impl, device)
    if reason:
        pytest.skip(reason)
    err, errs = _verified(impl, shape, device, dtype, head)
    assert err is None or impl in peers.APPROXIMATE, err
    trainable = head == "trainable"
    hidden, weight, labels = _inputs(shape, device, dtype, trainable)
    fn = peers.PEERS[impl]
    prepare, run = _steps(fn, hidden, weight, labels, trainable, mode, device)
    if not benchmark.disabled:
        run(prepare())  # warm-up outside the measurement (compiles, autotunes); CI (disabled) runs once only
    peak = common.cuda_peak_rise(prepare, run, device, leaves=(hidden, weight))  # over the inputs alone
    rounds, warmup = ROUNDS[torch.device(device).type]
    benchmark.pedantic(run, setup=lambda: ((prepare(),), {}), rounds=rounds, warmup_rounds=warmup)
    seconds = common.median_seconds(benchmark)
    # the plain call is recorded with the path it took (its units are that path's)
    same_as, path = peers.default_path(device) if impl == "default" else (impl, None)
    common.record(
        benchmark, device, impl=impl, shape=shape.name, mode=mode, head=head, peak_mem_bytes=peak,
        tflops=common.effective_tflops(shape, mode, trainable, seconds), dtype=str(dtype).replace("torch.", ""),
        D=shape.D, V=shape.V, B=shape.B, T=shape.T, n_counted=shape.counted,
        work_units=common.work_units(mode, trainable), path_units=common.path_units(same_as, mode, trainable, shape),
        rel_err_vs_reference=errs, **({"loss_path": path, "same_as": same_as} if path else {}),
    )


def _params(shapes):
    return [
        pytest.param(s, i, m, h, id=f"{s.name}-{i}-{m}-{h}")
        for s in shapes for i in IMPLS for h in HEADS for m in MODES
    ]


@pytest.mark.parametrize(("shape", "impl", "mode", "head"), _params(common.CPU_SHAPES))
def test_kernel_cpu(benchmark, shape, impl, mode, head):
    benchmark.group = f"kernel-{shape.name}-{mode}-{head}"
    run_case(benchmark, shape, impl, mode, head, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize(("shape", "impl", "mode", "head"), _params(common.GPU_SHAPES))
def test_kernel_gpu(benchmark, shape, impl, mode, head):
    benchmark.group = f"kernel-{shape.name}-{mode}-{head}"
    run_case(benchmark, shape, impl, mode, head, "cuda", torch.bfloat16)


def _matmul_flops(n: int) -> float:
    return 2.0 * n**3


def _matmul_peak(benchmark, device: torch.device):
    """The roofline of this run: dense matmul TFLOP/s (bf16 8192^3 on CUDA, float32 512^3 on CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def run():
        out = a @ b
        common.sync(device)
        return out

    run()
    rounds = 20 if device.type == "cuda" else 5
    benchmark.group = "matmul_peak"
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=3)
    seconds = common.median_seconds(benchmark)
    common.record(
        benchmark, device, impl="matmul_peak", shape=f"{n}x{n}x{n}", mode="forward", head=None, peak_mem_bytes=None,
        tflops=_matmul_flops(n) / seconds / 1e12 if seconds else None, dtype=str(dtype).replace("torch.", ""),
    )


def test_matmul_peak_cpu(benchmark):
    _matmul_peak(benchmark, torch.device("cpu"))


@pytest.mark.gpu
def test_matmul_peak_gpu(benchmark):
    _matmul_peak(benchmark, torch.device("cuda"))
