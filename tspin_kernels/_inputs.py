"""Argument checking and the layout step shared by every implementation.

Every implementation sees the same thing: a 2-D ``hidden`` view ``(N, D)``, the positions that count (``row_idx``),
their targets, the sequence each belongs to and a per-token scale (1, or 1/count for ``average=True``).
Ignored positions are dropped here, before any matmul, and ``shift=True`` only moves the integer labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # float64: torch paths only, for checks


@dataclass
class Compacted:
    hidden2d: torch.Tensor  # (N, D) view of the caller's hidden states (no copy when contiguous)
    hidden_shape: torch.Size  # to reshape grad_hidden back
    row_idx: torch.Tensor  # (Nc,) int64: rows of hidden2d that count
    target: torch.Tensor  # (Nc,) int64 token ids
    seq_id: torch.Tensor  # (Nc,) int64 sequence of each counted row
    token_scale: torch.Tensor  # (Nc,) float32: 1, or 1/count(seq) when averaging
    num_seqs: int


def _fail_type(name: str, expected: str, got) -> TypeError:
    return TypeError(f"{name}: expected {expected}, got {got}")


def check_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index, check_finite: bool) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise _fail_type("hidden", "a torch.Tensor", type(hidden).__name__)
    if not isinstance(weight, torch.Tensor):
        raise _fail_type("weight", "a torch.Tensor", type(weight).__name__)
    if not isinstance(labels, torch.Tensor):
        raise _fail_type("labels", "a torch.Tensor", type(labels).__name__)
    if hidden.dtype not in _FLOATS:
        raise _fail_type("hidden", "dtype bfloat16, float16 or float32 (float64 on the torch paths)", hidden.dtype)
    if weight.dtype != hidden.dtype:
        raise _fail_type("weight", f"the same dtype as hidden ({hidden.dtype})", weight.dtype)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise _fail_type("labels", "an integer dtype (int64 or int32)", labels.dtype)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (V, D), got {tuple(weight.shape)}")
    V, D = weight.shape
    if V == 0 or D == 0:
        raise ValueError(f"weight: expected non-empty (V, D), got {tuple(weight.shape)}")
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(
                f"hidden: expected (R, T, D) (or packed (N, D) together with cu_seqlens), got {tuple(hidden.shape)}"
            )
    else:
        if hidden.dim() != 2:
            raise ValueError(f"hidden: with cu_seqlens expected packed (N, D), got {tuple(hidden.shape)}")
    if hidden.shape[-1] != D:
        raise ValueError(f"hidden: last dimension must equal weight's D={D}, got {tuple(hidden.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden without D), got {tuple(labels.shape)}"
        )
    for name, t in (("weight", weight), ("labels", labels)):
        if t.device != hidden.device:
            raise ValueError(f"{name}: expected to be on {hidden.device} like hidden, got {t.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise _fail_type("bias", "a torch.Tensor or None", type(bias).__name__)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias: expected shape ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise _fail_type("bias", f"the same dtype as hidden ({hidden.dtype})", bias.dtype)
        if bias.device != hidden.device:
            raise ValueError(f"bias: expected to be on {hidden.device} like hidden, got {bias.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise _fail_type("ignore_index", "an int", type(ignore_index).__name__)
    if 0 <= ignore_index < V:
        raise ValueError(f"ignore_index: must lie outside the vocabulary [0, {V}), got {ignore_index}")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device)
    counted = labels != ignore_index
    if counted.any():
        lo, hi = labels[counted].min().item(), labels[counted].max().item()
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels: values must be in [0, {V}) or equal ignore_index={ignore_index}, found {bad}")
    if check_finite and not bool(torch.isfinite(hidden).all()):
        raise ValueError("hidden: contains NaN or Inf values (check_finite=True)")


def _check_cu_seqlens(cu: torch.Tensor, n: int, device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise _fail_type("cu_seqlens", "an integer torch.Tensor of shape (S+1,)", type(cu).__name__)
    if cu.dtype.is_floating_point or cu.dtype == torch.bool or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"cu_seqlens: expected an integer tensor of shape (S+1,) with S>=1, got {cu.dtype} {tuple(cu.shape)}"
        )
    if cu.device != device:
        raise ValueError(f"cu_seqlens: expected to be on {device} like hidden, got {cu.device}")
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"cu_seqlens: must start at 0, got {c[0]}")
    if any(b < a for a, b in zip(c[:-1], c[1:])):
        raise ValueError(f"cu_seqlens: must be non-decreasing offsets, got {c if len(c) <= 16 else c[:16] + ['...']}")
    if c[-1] != n:
        raise ValueError(f"cu_seqlens: must end at the packed length N={n} of hidden, got {c[-1]}")


def check_scalar(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail_type(name, "a finite number", repr(value))
    return float(value)


def compact(hidden, labels, cu_seqlens, ignore_index: int, shift: bool, average: bool) -> Compacted:
    """Flatten to (N, D), apply the label shift and keep only counted positions."""
    dev = hidden.device
    if cu_seqlens is None:
        R, T, D = hidden.shape
        lab = labels.long()
        if shift:  # position t predicts input t+1; the last position of each row predicts nothing
            lab = torch.cat([lab[:, 1:], lab.new_full((R, 1), ignore_index)], dim=1)
        lab = lab.reshape(-1)
        hidden2d = hidden.reshape(R * T, D)
        num_seqs = R
        row_idx = (lab != ignore_index).nonzero().squeeze(1)
        seq_id = torch.div(row_idx, max(T, 1), rounding_mode="floor")
    else:
        N, D = hidden.shape
        cu = cu_seqlens.long()
        lab = labels.long()
        num_seqs = cu.numel() - 1
        if shift:
            lab = torch.cat([lab[1:], lab.new_full((1,), ignore_index)])
            ends = cu[1:] - 1
            lab[ends[ends >= 0]] = ignore_index  # never predict across a segment boundary
        hidden2d = hidden
        row_idx = (lab != ignore_index).nonzero().squeeze(1)
        seq_id = torch.searchsorted(cu[1:], row_idx, right=True)
    target = lab[row_idx]
    if average:
        counts = torch.bincount(seq_id, minlength=num_seqs).clamp_min(1).float()
        token_scale = counts.reciprocal()[seq_id]  # float32; exact for the counts seen in practice
    else:
        token_scale = torch.ones(row_idx.numel(), dtype=torch.float32, device=dev)
    return Compacted(hidden2d, hidden.shape, row_idx, target, seq_id, token_scale, num_seqs)
