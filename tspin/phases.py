"""Where an iteration's time and memory go: wall seconds and peak accelerator memory per phase (proto sampling,
sampling y', SPIN's reference log-probs, training, checkpoints, evaluation), one line per phase in OUT/phases.jsonl.

A file of its own, not metrics.jsonl: these numbers depend on the machine and the clock, and a resumed run keeps
metrics.jsonl and summary.json equal to an uninterrupted run's. phases.jsonl tells what happened instead: a
resumed run appends its phases to those its killed attempt finished (a phase cut short writes nothing).

Phases nest (a checkpoint is written inside training): a line's ``seconds`` are the phase's own, its nested
phases' seconds taken out, so an iteration's lines add up to its wall time. On a GPU the clock waits for the
device at both ends of a phase (a few syncs per phase, never per step), and records two peaks:

- ``peak_allocated_gib``: this process's tensors (torch's allocator), the phase's nested phases included;
- ``peak_device_used_gib``: the whole GPU as the driver sees it, polled every 50 ms: what the vLLM engine (its own
  process), CUDA contexts and allocator caches hold comes in here, and only here.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .io import append_jsonl
from .ranks import is_main

GIB = float(1 << 30)
POLL_S = 0.05


class _DevicePoll:
    """The largest device-wide memory use seen while running (a thread polling the driver: NVML through torch)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        try:
            return int(torch.cuda.device_memory_used(self.device))
        except Exception:  # no NVML: the free/total pair the runtime gives (the same quantity)
            free, total = torch.cuda.mem_get_info(self.device)
            return int(total - free)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            self._stop.wait(POLL_S)

    def __enter__(self):
        self.peak = self._used()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())


@dataclass
class _Open:
    name: str
    start: float
    nested_s: float = 0.0
    peak_allocated: int = 0  # the largest peak of the nested phases (each resets torch's counter)


class PhaseClock:
    """Times the phases of a run: ``with clock.phase("train", iteration=t): ...``. ``path``: the JSONL file the
    lines are appended to (rank 0 alone writes; None: nothing is written); ``device``: where the policy lives (the
    peaks are recorded on CUDA only); ``timer``: the clock read (seconds)."""

    def __init__(self, path=None, device: torch.device | str | None = None, timer=time.perf_counter):
        self.path, self.timer = path, timer
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._open: list[_Open] = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str, *, iteration: int):
        self._sync()
        if self.cuda:
            if self._open:  # the enclosing phase keeps the peak it reached so far: the reset below loses it
                parent = self._open[-1]
                parent.peak_allocated = max(parent.peak_allocated, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        now = _Open(name, self.timer())
        self._open.append(now)
        poll = _DevicePoll(self.device) if self.cuda else contextlib.nullcontext()
        try:
            with poll:
                yield
                self._sync()
        finally:
            self._open.pop()
        # (a phase that raised records nothing: its seconds would count work that is redone)
        total = self.timer() - now.start
        line = {"phase": name, "iteration": iteration, "seconds": round(total - now.nested_s, 4)}
        if self.cuda:
            peak = max(now.peak_allocated, torch.cuda.max_memory_allocated(self.device))
            line.update(peak_allocated_gib=round(peak / GIB, 3), peak_device_used_gib=round(poll.peak / GIB, 3))
            if self._open:
                self._open[-1].peak_allocated = max(self._open[-1].peak_allocated, peak)
        if self._open:
            self._open[-1].nested_s += total
        if self.path is not None and is_main():
            append_jsonl(self.path, line)


NULL_CLOCK = PhaseClock()


def phase_table(path) -> dict[str, dict[str, dict]]:
    """A phases.jsonl file per iteration and phase: {"start": {"eval": {...}, "proto": {...}}, "iter0": {"sample":
    {"seconds": s, "peak_allocated_gib": g, "peak_device_used_gib": g}, "train": {...}, ...}, ...}: the seconds
    summed, the peaks (GPU runs) the largest; "start" is before the loop (iteration -1: pi_0's evaluation and the
    proto samples)."""
    out: dict[str, dict[str, dict]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # the line a kill tore
            continue
        key = "start" if r["iteration"] < 0 else f"iter{r['iteration']}"
        p = out.setdefault(key, {}).setdefault(r["phase"], {"seconds": 0.0})
        p["seconds"] = round(p["seconds"] + r["seconds"], 4)
        for k in ("peak_allocated_gib", "peak_device_used_gib"):
            if k in r:
                p[k] = max(p.get(k, 0.0), r[k])
    return out


def phase_summary(path) -> dict[str, dict[str, float]]:
    """:func:`phase_table`'s seconds alone: {"start": {"eval": s, "proto": s}, "iter0": {"sample": s, "train": s,
    "checkpoint": s, "eval": s}, ...}."""
    return {key: {name: p["seconds"] for name, p in phases.items()} for key, phases in phase_table(path).items()}
