"""Argument checking and the layout step shared by every implementation.

Every implementation sees the same thing: a 2-D ``hidden`` view ``(N, D)``, the positions that count (``row_idx``),
their targets, the sequence each belongs to and a per-token scale (1, or 1/count for ``average=True``).
Ignored positions are dropped here, before any matmul, and ``shift=True`` only moves the integer labels.

What the checks cost (on CUDA a "host sync" waits for the device to finish everything queued before it):

- free, always run: Python types, tensor shapes, dtypes and devices (metadata only);
- ``validate=True`` (default): label values in ``[0, V)`` or ``ignore_index``, ``cu_seqlens`` starting at 0,
  non-decreasing and ending at N. They are reduced on the device and read back together: **one** host sync;
- ``check_finite=True`` (opt-in): NaN/Inf in ``hidden``, one more reduction, read back with the above;
- compaction (every call): ``nonzero`` of the counted positions, **one** host sync on CUDA (the number of
  counted rows sizes every later buffer and launch). Nothing else in the path reads device values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # float64: torch paths only, for checks


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


def check_cu_seqlens_layout(cu, device) -> None:
    """The free part of the ``cu_seqlens`` checks: type, dtype, shape, device."""
    check_tensor("cu_seqlens", cu, "an integer torch.Tensor of shape (S+1,)")
    if cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool or cu.dim() != 1 \
            or cu.numel() < 2:
        raise ValueError(
            f"cu_seqlens: expected an integer tensor of shape (S+1,) with S>=1, got {cu.dtype} {tuple(cu.shape)}"
        )
    if device is not None and cu.device != device:
        raise ValueError(f"cu_seqlens: expected to be on {device} like hidden, got {cu.device}")


def check_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index, *, validate: bool,
                 check_finite: bool) -> None:
    from .positions import CountedPositions, check_positions_layout, positions_checks

    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    if not isinstance(labels, CountedPositions):
        check_tensor("labels", labels, "a torch.Tensor or a tspin_kernels.CountedPositions")
    if hidden.dtype not in _FLOATS:
        raise fail_type("hidden", "dtype bfloat16, float16 or float32 (float64 on the torch paths)", hidden.dtype)
    if weight.dtype != hidden.dtype:
        raise fail_type("weight", f"the same dtype as hidden ({hidden.dtype})", weight.dtype)
    if not isinstance(labels, CountedPositions) and (
            labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool):
        raise fail_type("labels", "an integer dtype (int64 or int32)", labels.dtype)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (V, D), got {tuple(weight.shape)}")
    V, D = weight.shape
    if V == 0 or D == 0:
        raise ValueError(f"weight: expected non-empty (V, D), got {tuple(weight.shape)}")
    if isinstance(labels, CountedPositions):
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: counted positions address hidden rows directly; pass cu_seqlens=None")
        if hidden.dim() not in (2, 3) or hidden.shape[-1] != D:
            raise ValueError(f"hidden: expected (N, D) or (R, T, D) with D={D} like weight, got {tuple(hidden.shape)}")
        check_positions_layout(labels, hidden.device)
    elif cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(
                f"hidden: expected (R, T, D) (or packed (N, D) together with cu_seqlens), got {tuple(hidden.shape)}"
            )
    else:
        if hidden.dim() != 2:
            raise ValueError(f"hidden: with cu_seqlens expected packed (N, D), got {tuple(hidden.shape)}")
    if not isinstance(labels, CountedPositions):
        if hidden.shape[-1] != D:
            raise ValueError(f"hidden: last dimension must equal weight's D={D}, got {tuple(hidden.shape)}")
        if tuple(labels.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden without D), got {tuple(labels.shape)}"
            )
        if labels.device != hidden.device:
            raise ValueError(f"labels: expected to be on {hidden.device} like hidden, got {labels.device}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected to be on {hidden.device} like hidden, got {weight.device}")
    if bias is not None:
        check_tensor("bias", bias, "a torch.Tensor or None")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias: expected shape ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise fail_type("bias", f"the same dtype as hidden ({hidden.dtype})", bias.dtype)
        if bias.device != hidden.device:
            raise ValueError(f"bias: expected to be on {hidden.device} like hidden, got {bias.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise fail_type("ignore_index", "an int", type(ignore_index).__name__)
    if 0 <= ignore_index < V:
        raise ValueError(f"ignore_index: must lie outside the vocabulary [0, {V}), got {ignore_index}")
    if cu_seqlens is not None:
        check_cu_seqlens_layout(cu_seqlens, hidden.device)
    if validate or check_finite:
        checks = []
        if validate and isinstance(labels, CountedPositions):
            checks = positions_checks(labels, hidden.numel() // D, V)
            labels = None
        _check_values(hidden, labels, cu_seqlens, ignore_index, V, validate, check_finite, checks)


def _check_values(hidden, labels, cu_seqlens, ignore_index: int, V: int, validate: bool, check_finite: bool,
                  checks: list):
    if validate and labels is not None:
        counted = labels != ignore_index
        checks.append(((counted & ((labels < 0) | (labels >= V))).any(),
                       lambda: _label_error(labels, counted, ignore_index, V)))
    if validate and cu_seqlens is not None:
        checks += cu_seqlens_checks(cu_seqlens, hidden.shape[0])
    if check_finite:
        checks.append((~torch.isfinite(hidden).all(),
                       lambda: ValueError("hidden: contains NaN or Inf values (check_finite=True)")))
    raise_first(checks)


def cu_seqlens_checks(cu: torch.Tensor, n: int) -> list:
    """``cu_seqlens`` starts at 0, never decreases and ends at ``n``, as (device flag, error) pairs."""
    c = lambda: cu.tolist()  # noqa: E731  (read only to word an error)
    return [
        (cu[0] != 0, lambda: ValueError(f"cu_seqlens: must start at 0, got {c()[0]}")),
        ((cu[1:] < cu[:-1]).any(), lambda: ValueError(
            f"cu_seqlens: must be non-decreasing offsets, got {c() if len(c()) <= 16 else c()[:16] + ['...']}")),
        (cu[-1] != n, lambda: ValueError(f"cu_seqlens: must end at the packed length N={n}, got {c()[-1]}")),
    ]


def raise_first(checks: list) -> None:
    """(0-d bool device tensor: True = bad, () -> exception) pairs: all flags read back in **one** host sync; only
    a failure reads more, to name the offending value."""
    if not checks:
        return
    for bad, (_, error) in zip(torch.stack([flag for flag, _ in checks]).tolist(), checks):
        if bad:
            raise error()


def _label_error(labels, counted, ignore_index: int, V: int) -> ValueError:
    vals = labels[counted]
    bad = vals[(vals < 0) | (vals >= V)][0].item()
    return ValueError(f"labels: values must be in [0, {V}) or equal ignore_index={ignore_index}, found {bad}")


def compact(hidden, labels, cu_seqlens, ignore_index: int, shift: bool, average: bool) -> Compacted:
    """Flatten to (N, D), apply the label shift and keep only counted positions.

    ``nonzero`` is this path's one host sync on CUDA (its output size is data-dependent); everything else here
    stays on the device (no boolean-mask indexing, no ``bincount``, which read sizes back too)."""
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
            if N:  # never predict across a segment boundary; an empty leading segment's end (-1) wraps to the
                # last position, which the shift has already ignored
                lab.index_fill_(0, (cu[1:] - 1).remainder(N), ignore_index)
        hidden2d = hidden
        row_idx = (lab != ignore_index).nonzero().squeeze(1)
        seq_id = torch.searchsorted(cu[1:], row_idx, right=True)
    target = lab[row_idx]
    if average:
        ones = torch.ones(seq_id.numel(), dtype=torch.float32, device=dev)
        counts = torch.zeros(num_seqs, dtype=torch.float32, device=dev).index_add_(0, seq_id, ones).clamp_min(1)
        token_scale = counts.reciprocal()[seq_id]  # float32; counts are exact up to 2**24 tokens per sequence
    else:
        token_scale = torch.ones(row_idx.numel(), dtype=torch.float32, device=dev)
    return Compacted(hidden2d, row_idx, target, seq_id, token_scale, num_seqs)
