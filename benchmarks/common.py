"""Shared pieces of the benchmark suite: shapes, inputs, provenance, FLOP counting and memory measurement.

Hardware is inspected only through ``tspin_kernels._device`` (the project's single place for that).
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from tspin_kernels import _defaults, _device

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Shape:
    name: str
    D: int
    V: int
    B: int  # triplets: 3B rows [real; generated; proto]
    T: int

    @property
    def rows(self) -> int:
        return 3 * self.B

    @property
    def counted(self) -> int:
        """Counted (response) positions: the first half of every row is prompt and ignored."""
        return self.rows * (self.T - self.T // 2)


# The GPU benchmark shapes of docs/contract.md (bf16 on the GPU).
GPU_SHAPES = (
    Shape("mistral-7b", 4096, 32000, 4, 1024),
    Shape("llama3-8b", 4096, 128256, 2, 2048),
    Shape("qwen2.5-1.5b", 1536, 151936, 4, 1024),
)
# Tiny CPU shape: runs in CI (benchmarking disabled) so the suite cannot rot; V is deliberately not a power of 2.
CPU_SHAPES = (Shape("tiny-cpu", 64, 1000, 1, 64),)


def make_inputs(shape: Shape, device, dtype, head_trainable: bool, seed: int = 0):
    """hidden (3B, T, D) and weight (V, D) leaf tensors and aligned labels with the first half of each row ignored."""
    # generated where they live: at llama3-8b the weight alone is 525M values, slow to draw on the CPU
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(shape.rows, shape.T, shape.D, generator=g, device=device).to(dtype)
    weight = (torch.randn(shape.V, shape.D, generator=g, device=device) / shape.D**0.5).to(dtype)
    labels = torch.randint(0, shape.V, (shape.rows, shape.T), generator=g, device=device)
    labels[:, : shape.T // 2] = IGNORE_INDEX
    hidden.requires_grad_(True)
    weight.requires_grad_(head_trainable)
    return hidden, weight, labels


# ---------------------------------------------------------------------------------------------- FLOPs
def work_units(mode: str, head_trainable: bool) -> int:
    """Matmul units of 2*N_counted*D*V: forward 1; backward 2 (grad_h + grad_W) or 1 with a frozen head."""
    bwd = 2 if head_trainable else 1
    return {"forward": 1, "backward": bwd, "fwd_bwd": 1 + bwd}[mode]


def path_units(impl: str, mode: str, head_trainable: bool, shape: Shape) -> float | None:
    """Units of 2*N_counted*D*V that implementation ``impl`` actually does in ``mode`` (``peers.PATH_UNITS``):
    3 for the fused loss path, 4 for the recompute paths, 3 * N_total / N_counted for naive (full logits at every
    position). None where the suite does not state it (CCE, Liger)."""
    from benchmarks.peers import PATH_UNITS

    entry = PATH_UNITS.get(impl, {}).get(head_trainable)
    if entry is None:
        return None
    scale = shape.rows * shape.T / shape.counted if entry[0] == "all" else 1.0
    fwd, bwd = entry[-2:]
    return scale * {"forward": fwd, "backward": bwd, "fwd_bwd": fwd + bwd}[mode]


def effective_tflops(shape: Shape, mode: str, head_trainable: bool, seconds: float | None) -> float | None:
    if not seconds:
        return None
    flops = work_units(mode, head_trainable) * 2.0 * shape.counted * shape.D * shape.V
    return flops / seconds / 1e12


# ---------------------------------------------------------------------------------------------- provenance
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.cache
def commit() -> str:
    """TSPIN_COMMIT (set it where the tree travels without .git, e.g. the GPU machine), else git HEAD (+dirty)."""
    env = os.environ.get("TSPIN_COMMIT", "").strip()
    if env:
        return env
    head = _git("rev-parse", "--short=12", "HEAD")
    if not head:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "tspin_kernels", "benchmarks")
    return head + ("+dirty" if dirty else "")


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@functools.cache
def device_label() -> str:
    return _device.device_name(bench_device())


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_label().lower()).strip("-") or "unknown"


def triton_version() -> str | None:
    if not _device.triton_importable():
        return None
    import triton

    return triton.__version__


# settings that change what the kernels do, recorded with every result: the environment defaults of the kernel
# options (the benchmarks pass their options as keywords; a default still applies where they pass none)
_ENV_KNOBS = (*_defaults.ENV_VARS, "TRITON_INTERPRET", "OMP_NUM_THREADS")


@functools.cache
def provenance() -> dict:
    return {
        "device": device_label(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": commit(),
        "env": {k: os.environ[k] for k in _ENV_KNOBS if os.environ.get(k)},
        "packages": {d: _dist_version(d) for d in _DISTS},
    }


_DISTS = ("cut-cross-entropy", "liger-kernel", "transformers", "peft", "pytest-benchmark")


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def results_path(now: _dt.datetime | None = None) -> Path:
    """``benchmarks/results/<device>-<yyyymmdd>.json`` (UTC date); ``TSPIN_BENCH_OUT`` overrides it."""
    env = os.environ.get("TSPIN_BENCH_OUT", "").strip()
    if env:
        return Path(env)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return RESULTS_DIR / f"{device_slug()}-{now:%Y%m%d}.json"


# ---------------------------------------------------------------------------------------------- timing/memory
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(*tensors) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t.grad = None


class CudaMemory:
    """The allocator statistics the memory figures read (CUDA's caching allocator on one device)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def peak_rise(prepare, run, memory, leaves=()) -> int:
    """Peak memory rise of ``run(prepare())`` over the inputs alone, as ``memory`` (``CudaMemory``) counts it.

    The gradients an earlier call left on ``leaves`` (the inputs) are freed before the baseline is read, so what
    this call allocates counts whole: a trainable head's figure includes its weight gradient. ``prepare`` is not
    part of the peak window but its allocations count in the rise (for the backward mode it runs the forward,
    whose saved tensors stay alive during backward)."""
    clear_grads(*leaves)
    gc.collect()
    memory.sync()
    base = memory.allocated()
    state = prepare()
    memory.sync()
    memory.reset_peak()
    out = run(state)
    memory.sync()
    peak = memory.peak()
    del out, state
    return int(peak - base)


def cuda_peak_rise(prepare, run, device, leaves=()) -> int | None:
    """:func:`peak_rise` on CUDA; None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_rise(prepare, run, CudaMemory(device), leaves)


def median_seconds(benchmark) -> float | None:
    """Median of a pytest-benchmark run (None when benchmarking is disabled)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    inner = getattr(stats, "stats", stats)
    return float(inner.median)


def record(benchmark, device, **info) -> None:
    """Write the contract's ``extra_info`` fields (and any extra ones) on a record measured on ``device``."""
    benchmark.extra_info.update(provenance())
    benchmark.extra_info["device"] = _device.device_name(torch.device(device))
    benchmark.extra_info.update(info)
