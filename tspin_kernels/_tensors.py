"""What every input module shares: the compacted layout each implementation sees, and the basic tensor checks.

A module of its own so that both ways of saying which positions count (labels, in ``_inputs``, and explicit
triples, in ``positions``) can use them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Compacted:
    hidden2d: torch.Tensor  # (N, D) view of the caller's hidden states (no copy when contiguous)
    row_idx: torch.Tensor  # (Nc,) int64: rows of hidden2d that count
    target: torch.Tensor  # (Nc,) int64 token ids
    seq_id: torch.Tensor  # (Nc,) int64 sequence of each counted row
    token_scale: torch.Tensor  # (Nc,) float32: 1, or 1/count(seq) when averaging
    num_seqs: int
    unique_rows: bool = True  # False: a row may repeat (CountedPositions); grad_hidden sums over the repeats


def fail_type(name: str, expected: str, got) -> TypeError:
    return TypeError(f"{name}: expected {expected}, got {got}")


def check_tensor(name: str, t, expected: str = "a torch.Tensor") -> None:
    if not isinstance(t, torch.Tensor):
        raise fail_type(name, expected, type(t).__name__)


def check_not_meta(name: str, t) -> None:
    """The first tensor of a call must hold data (the others are then checked to be on its device)."""
    if isinstance(t, torch.Tensor) and t.device.type == "meta":
        raise ValueError(f"{name}: is on the meta device, a tensor without data (e.g. a model built under "
                         "torch.device('meta') whose weights were never loaded); load or move it to cpu / cuda first")
