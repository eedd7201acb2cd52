"""Metrics: one JSON object per line (SPEC section 1 / TRL names), plus the per-method summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .io import atomic_write_jsonl, read_jsonl


class MetricsWriter:
    """Appends metric lines; `rewind` drops lines a killed run wrote after the checkpoint it resumes from.
    Under torchrun only rank 0 touches the file (every rank computes the same, already reduced, values)."""

    def __init__(self, path: str | Path, static: dict | None = None):
        from .ranks import is_main

        self.path = Path(path)
        self.enabled = is_main()
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.static = static or {}

    def write(self, **values) -> dict:
        row = {**self.static, **values}
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
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


class Averager:
    """Example-weighted running means of a step's micro-batch metrics."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, metrics: dict, weight: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * weight
        self.n += weight

    def means(self) -> dict:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}


def load_metrics(path: str | Path) -> list[dict]:
    return read_jsonl(path) if Path(path).exists() else []
