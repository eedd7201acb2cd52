"""Metrics: running means kept on the device, and the metrics file (one JSON object per line, TRL's names)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .io import append_jsonl, atomic_write_jsonl
from .ranks import all_sum, is_main


class Averager:
    """Example-weighted running means of metrics given as 0-d tensors.

    The sums are float64 tensors on the metrics' device: adding never reads a value back to the host (on a GPU
    that would stall the stream once per metric and micro-batch). :meth:`means` reads them all at once.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, metrics: dict[str, torch.Tensor], weight: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().double() * weight
        self.n += weight

    def add_ranks(self) -> None:
        """Sum over ranks (one collective, no host sync); the counts (``n``) are the caller's, already global."""
        if not self.sums:
            return
        keys = sorted(self.sums)
        total = all_sum(torch.stack([self.sums[k] for k in keys]))
        self.sums = dict(zip(keys, total.unbind()))

    def mean_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}

    def means(self) -> dict[str, float]:
        """The means as Python floats: one host sync for all of them."""
        return read_back(self.mean_tensors())

    def state(self) -> tuple[dict[str, float], int]:
        """Picklable and device-free, for a checkpoint."""
        return read_back(self.sums), self.n

    @classmethod
    def from_state(cls, state: tuple[dict[str, float], int], device: torch.device) -> Averager:
        avg = cls()
        sums, avg.n = state
        avg.sums = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in sums.items()}
        return avg


def read_back(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-d tensors -> Python floats with one device-to-host copy (one sync) for all of them."""
    if not values:
        return {}
    return dict(zip(values, torch.stack([v.double() for v in values.values()]).tolist()))


class MetricsWriter:
    """Appends metric lines; `rewind` drops lines a killed run wrote after the checkpoint it resumes from.
    Under torchrun only rank 0 touches the file (every rank computes the same, already reduced, values)."""

    def __init__(self, path: str | Path, static: dict | None = None):
        self.path = Path(path)
        self.enabled = is_main()
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.static = static or {}

    def write(self, **values) -> dict:
        row = {**self.static, **values}
        if not self.enabled:
            return row
        append_jsonl(self.path, row)
        return row

    def rewind(self, keep) -> None:
        """Keep only the rows for which keep(row) is true (atomically)."""
        if not self.enabled or not self.path.exists():
            return
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
        atomic_write_jsonl(self.path, [r for r in rows if keep(r)])

