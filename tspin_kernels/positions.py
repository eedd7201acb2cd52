"""Counted positions given explicitly: (hidden row, target, sequence) triples in which a row may repeat.

Padded and packed batches describe what counts with ``labels`` (one target per position, ``ignore_index``
elsewhere), so a hidden row predicts at most one token of one sequence. A layout that shares a prompt between
several responses breaks that: the last prompt position predicts the first token of *every* response, so one row
serves several targets in several sequences. :class:`CountedPositions` states the triples directly; every
implementation takes them in the ``labels`` slot of :func:`tspin_kernels.sequence_logps` (and of the losses), and
the gradient of a repeated row is the sum over its repeats.

Checks, at the same cost as the label checks: the free ones (types, 1-D, one length, devices) always; with
``validate=True`` the values (rows in ``[0, N)``, targets in ``[0, V)``, sequence ids in ``[0, num_seqs)``) are
reduced on the device and read back in the call's one validation sync.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from ._tensors import Compacted, check_tensor, fail_type

__all__ = ["CountedPositions"]


class CountedPositions(NamedTuple):
    """The positions that count, one entry per (row, target, sequence) triple.

    ``rows``: ``(Nc,)`` integer indices into ``hidden`` viewed as ``(N, D)`` (``(R, T, D)`` flattens to
    ``R*T`` rows); a row may appear several times. ``targets``: ``(Nc,)`` token ids in ``[0, V)`` predicted from
    those rows. ``seq_ids``: ``(Nc,)`` the sequence in ``[0, num_seqs)`` each triple adds its log-prob to.
    ``num_seqs``: the number of sequences (the length of the result); a sequence with no triple gets 0.
    """

    rows: torch.Tensor
    targets: torch.Tensor
    seq_ids: torch.Tensor
    num_seqs: int

    def to(self, device, non_blocking: bool = False) -> CountedPositions:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return CountedPositions(move(self.rows), move(self.targets), move(self.seq_ids), self.num_seqs)


def check_positions_layout(positions, device) -> None:
    """The free checks: a CountedPositions of three 1-D integer tensors of one length on ``device``."""
    if not isinstance(positions, CountedPositions):
        raise fail_type("labels", "an integer torch.Tensor or a tspin_kernels.CountedPositions",
                        type(positions).__name__)
    n = None
    for name in ("rows", "targets", "seq_ids"):
        t = getattr(positions, name)
        what = f"labels.{name}"
        check_tensor(what, t, "a 1-D integer torch.Tensor (Nc,)")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise fail_type(what, "an integer dtype (int64 or int32)", t.dtype)
        if t.dim() != 1:
            raise ValueError(f"{what}: expected a 1-D tensor (Nc,), got shape {tuple(t.shape)}")
        if n is not None and t.numel() != n:
            raise ValueError(f"{what}: expected {n} entries like labels.rows, got {t.numel()}")
        n = t.numel()
        if device is not None and t.device != device:
            raise ValueError(f"{what}: expected to be on {device} like hidden, got {t.device}")
    s = positions.num_seqs
    if isinstance(s, bool) or not isinstance(s, numbers.Integral):
        raise fail_type("labels.num_seqs", "an int", type(s).__name__)
    if s < 1:
        raise ValueError(f"labels.num_seqs: expected at least 1 sequence, got {s}")


def positions_checks(positions: CountedPositions, n_rows: int, V: int) -> list:
    """The value checks, as (device flag, error) pairs for ``_inputs.raise_first`` (one host sync for all)."""
    p = positions
    out_of = lambda t, hi: (t < 0) | (t >= hi)  # noqa: E731

    def first_bad(name, t, hi):
        return lambda: ValueError(f"labels.{name}: values must be in [0, {hi}), found {t[out_of(t, hi)][0].item()}")

    return [
        (out_of(p.rows, n_rows).any(), first_bad("rows", p.rows, n_rows)),
        (out_of(p.targets, V).any(), first_bad("targets", p.targets, V)),
        (out_of(p.seq_ids, p.num_seqs).any(), first_bad("seq_ids", p.seq_ids, p.num_seqs)),
    ]


def compact_positions(hidden: torch.Tensor, positions: CountedPositions, average: bool) -> Compacted:
    """The triples as the implementations take them: ``hidden`` as ``(N, D)``, int64 indices, a per-token scale.
    Nothing here reads device values (no host sync)."""
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    seq_id = positions.seq_ids.long()
    dev = hidden.device
    if average:
        ones = torch.ones(seq_id.numel(), dtype=torch.float32, device=dev)
        counts = torch.zeros(positions.num_seqs, dtype=torch.float32, device=dev).index_add_(0, seq_id, ones)
        token_scale = counts.clamp_min(1).reciprocal()[seq_id]
    else:
        token_scale = torch.ones(seq_id.numel(), dtype=torch.float32, device=dev)
    return Compacted(hidden2d, positions.rows.long(), positions.targets.long(), seq_id, token_scale,
                     int(positions.num_seqs), unique_rows=False)


def first_occurrence(row_idx: torch.Tensor) -> torch.Tensor:
    """For each entry, the index of the first entry holding the same row: the slot its hidden-gradient
    contributions are summed in. Sorting and a running maximum, all on the device (no host sync)."""
    n = row_idx.numel()
    if n == 0:
        return row_idx.clone()
    sorted_rows, order = torch.sort(row_idx, stable=True)
    ar = torch.arange(n, device=row_idx.device)
    starts = torch.ones(n, dtype=torch.bool, device=row_idx.device)
    starts[1:] = sorted_rows[1:] != sorted_rows[:-1]
    group_start = torch.where(starts, ar, torch.zeros_like(ar)).cummax(0).values
    slot = torch.empty_like(order)
    slot[order] = order[group_start]  # stable sort: a group's first sorted entry is its first occurrence
    return slot
