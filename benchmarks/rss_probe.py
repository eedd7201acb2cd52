"""Peak host-memory (RSS) rise of one ``sequence_logps`` forward+backward, measured in this (fresh) process.

    python -m benchmarks.rss_probe --impl torch --rows 8 --T 1024 --D 256 --V 50000 [--dtype float32] [--warmup]
    python -m benchmarks.rss_probe --peer torch_recompute --rows 6 ...   # a benchmark peer's T-SPIN loss instead

Prints one JSON line: ``{"impl", "baseline_rss", "peak_rss", "rise_bytes", "seconds", "method", ...}``.
The baseline is the resident set once the inputs exist; the peak is the kernel's high-water mark (``VmHWM``),
reset just before the measured call through ``/proc/self/clear_refs`` (falls back to ``ru_maxrss`` where that
file cannot be written, which then also counts anything that peaked earlier in the process).
Half of every row is ignored (prompt), the head is trainable. One impl per process: the torch allocator and
glibc keep freed memory around, so impls measured in one process would disturb each other.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

_PAGE = 4096


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def peak_rss(reset_ok: bool) -> int:
    if reset_ok:
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def in_fresh_process(*args: str, threads: int | None = None, timeout: int = 1800) -> dict:
    """Run this probe with ``args`` in a fresh Python process (cwd: the repository) and return its JSON line."""
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the measured paths do not use Triton; keep the child's import light
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "benchmarks.rss_probe", *args]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--impl", choices=["torch", "reference", "triton"], help="sequence_logps(impl=...)")
    target.add_argument("--peer", help="a benchmarks.peers.PEERS entry: its T-SPIN loss (rows = 3B)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--V", type=int, default=50000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warmup", action="store_true", help="run once before the measured call")
    a = p.parse_args(argv)

    import torch

    from tspin_kernels import sequence_logps

    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.rows, a.T, a.D, generator=g, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(a.V, a.D, generator=g) / a.D**0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, a.V, (a.rows, a.T), generator=g)
    labels[:, : a.T // 2] = -100

    if a.peer is not None:
        from benchmarks.peers import PEERS

        if a.peer not in PEERS or a.rows % 3:
            p.error(f"--peer: expected one of {sorted(PEERS)} with --rows a multiple of 3, got {a.peer!r}, {a.rows}")

        def step():
            PEERS[a.peer](hidden, weight, labels, True).backward()
    else:
        def step():
            sequence_logps(hidden, weight, labels, impl=a.impl).sum().backward()

    if a.warmup:
        step()
        hidden.grad = weight.grad = None
    gc.collect()
    baseline = current_rss()
    ok = reset_peak()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = peak_rss(ok)
    res = {
        "impl": a.impl or a.peer, "rows": a.rows, "T": a.T, "D": a.D, "V": a.V, "dtype": a.dtype, "warmup": a.warmup,
        "baseline_rss": baseline, "peak_rss": peak, "rise_bytes": max(0, peak - baseline), "seconds": seconds,
        "method": "VmHWM after clear_refs" if ok else "ru_maxrss", "threads": torch.get_num_threads(),
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
