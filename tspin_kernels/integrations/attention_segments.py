"""Which keys each query of a packed or shared-prefix row attends to, as a host-side list of pieces.

The varlen attention (:mod:`tspin_kernels.integrations.varlen_sdpa`) runs one attention per bucket of equal pieces
instead of one attention over the whole row behind a ``(sum of lengths)**2`` mask. A piece is ``q_len`` query
tokens that see, causally, themselves and all of ``prefix_len`` earlier tokens held elsewhere in the rows:

- a packed sequence is one piece without prefix;
- a shared-prefix example is its prefix (a piece without prefix) and one piece per response whose prefix is the
  example's shared prefix: the response's tokens continue from the prefix's last position, as in a padded row.

Token indices are flat over the ``(R, T)`` rows. The pieces are built on the host from lengths the collator already
has, so handing them to the attention reads nothing back from the device; the index tensors go to the device once
per batch and are reused by every layer (and by the recomputation of gradient checkpointing).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["AttentionSegments", "VARLEN_SDPA"]

# The name our attention implementation is registered under with transformers (varlen_sdpa.py): here, in the
# module every layout imports, so that naming it needs none of the attention code
VARLEN_SDPA = "varlen_sdpa"


class _Bucket:
    """Pieces of one shape ``(q_len, prefix_len)``: their query and key indices, and whether the queries are one
    contiguous run of back-to-back pieces without prefix (then a view of the row replaces the gather)."""

    def __init__(self, q_len: int, prefix_len: int, q_starts: np.ndarray, prefix_starts: np.ndarray):
        self.q_len, self.prefix_len, self.n = q_len, prefix_len, len(q_starts)
        self.start = int(q_starts[0])
        self.q_index = (q_starts[:, None] + np.arange(q_len)).reshape(-1)
        self.contiguous = prefix_len == 0 and bool((np.diff(q_starts) == q_len).all())
        self.kv_index = None if prefix_len == 0 else np.concatenate(
            [prefix_starts[:, None] + np.arange(prefix_len), q_starts[:, None] + np.arange(q_len)], axis=1).reshape(-1)


class AttentionSegments:
    """Pieces ``(q_start, q_len, prefix_start, prefix_len)`` covering each of ``tokens`` flat positions once.

    Build them with :meth:`packed` (sequence lengths), :meth:`from_position_ids` (positions restarting per
    sequence, read on the host) or :func:`~tspin_kernels.integrations.build_shared_prefix_batch` (its
    ``segments``). Pass them as ``attention_mask=`` to :func:`~tspin_kernels.integrations.causal_lm_sequence_logps`
    with a model loaded with ``attn_implementation="varlen_sdpa"``.
    """

    def __init__(self, pieces, tokens: int):
        arr = np.asarray(list(pieces), dtype=np.int64).reshape(-1, 4)
        arr = arr[arr[:, 1] > 0]  # an empty piece (a response cut to nothing) has no queries
        covered = np.zeros(tokens, dtype=np.int64)
        if len(arr):
            ends = arr[:, 0] + arr[:, 1]
            if (arr[:, 0] < 0).any() or (ends > tokens).any() or (arr[:, 3] < 0).any() or \
                    (arr[:, 2] < 0).any() or (arr[:, 2] + arr[:, 3] > tokens).any():
                raise ValueError(f"segments: a piece lies outside the {tokens} tokens of the rows")
            np.add.at(covered, np.repeat(arr[:, 0], arr[:, 1]) + _ranges(arr[:, 1]), 1)
        if not (covered == 1).all():
            raise ValueError(f"segments: every one of the {tokens} tokens must be the query of exactly one piece "
                             f"({int((covered == 0).sum())} of none, {int((covered > 1).sum())} of several)")
        self.pieces = arr
        self.tokens = int(tokens)
        self._buckets: list[_Bucket] | None = None
        self._device_cache: dict = {}

    # -- constructors ----------------------------------------------------------------------------------------
    @classmethod
    def packed(cls, lengths) -> AttentionSegments:
        """One row of back-to-back sequences of ``lengths`` tokens (a list, or ``cu_seqlens`` offsets' diffs)."""
        lengths = np.asarray(_host_ints(lengths, "lengths"), dtype=np.int64)
        if (lengths < 1).any():
            raise ValueError(f"lengths: expected positive sequence lengths, got {lengths.tolist()}")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        zeros = np.zeros_like(lengths)
        return cls(np.stack([starts, lengths, zeros, zeros], axis=1), int(lengths.sum()))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens) -> AttentionSegments:
        """From ``(S+1,)`` offsets (read on the host: one device sync if they live on a GPU)."""
        cu = np.asarray(_host_ints(cu_seqlens, "cu_seqlens"), dtype=np.int64)
        return cls.packed(np.diff(cu))

    @classmethod
    def from_position_ids(cls, position_ids) -> AttentionSegments:
        """``(R, T)`` positions: a sequence starts at each row's first token and wherever a position is not its
        predecessor's plus one (transformers' rule for packed rows). Read on the host."""
        pos = position_ids.detach().cpu().numpy() if isinstance(position_ids, torch.Tensor) else np.asarray(
            position_ids)
        pos = np.atleast_2d(pos).astype(np.int64)
        R, T = pos.shape
        starts = np.ones((R, T), dtype=bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        flat = np.flatnonzero(starts)
        ends = np.append(flat[1:], R * T)
        ends = np.minimum(ends, (flat // T + 1) * T)  # a sequence never runs into the next row
        zeros = np.zeros_like(flat)
        return cls(np.stack([flat, ends - flat, zeros, zeros], axis=1), R * T)

    @classmethod
    def rows(cls, num_rows: int, row_tokens: int) -> AttentionSegments:
        """Plain causal rows: one piece per row."""
        starts = np.arange(num_rows, dtype=np.int64) * row_tokens
        zeros = np.zeros_like(starts)
        return cls(np.stack([starts, np.full_like(starts, row_tokens), zeros, zeros], axis=1), num_rows * row_tokens)

    # -- what the attention uses -------------------------------------------------------------------------------
    @property
    def longest(self) -> int:
        """Keys of the longest piece (its prefix included)."""
        return int((self.pieces[:, 1] + self.pieces[:, 3]).max()) if len(self.pieces) else 0

    def buckets(self) -> list[_Bucket]:
        """Pieces grouped by shape, in order of their first query."""
        if self._buckets is None:
            groups: dict[tuple[int, int], list[int]] = {}
            for i, (_, q_len, _, p_len) in enumerate(self.pieces.tolist()):
                groups.setdefault((q_len, p_len), []).append(i)
            out = [_Bucket(q, p, self.pieces[idx, 0], self.pieces[idx, 2]) for (q, p), idx in groups.items()]
            self._buckets = sorted(out, key=lambda b: b.start)
        return self._buckets

    def device_indices(self, device: torch.device):
        """Per bucket ``(q_index, kv_index)`` on ``device`` (None where a view or no prefix makes one needless),
        and the permutation from the buckets' concatenated outputs back to token order (None: already in order)."""
        key = str(device)
        if key not in self._device_cache:
            buckets = self.buckets()
            order = np.concatenate([b.q_index for b in buckets])
            in_order = bool((order == np.arange(self.tokens)).all())
            to_dev = lambda a: None if a is None else torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
            per = [(None if b.contiguous else to_dev(b.q_index), to_dev(b.kv_index)) for b in buckets]
            self._device_cache[key] = (per, None if in_order else to_dev(np.argsort(order)))
        return self._device_cache[key]

    def __repr__(self) -> str:
        return f"AttentionSegments({len(self.pieces)} pieces over {self.tokens} tokens)"


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """``[0..l0-1, 0..l1-1, ...]`` for positive ``lengths``."""
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(lengths.sum())) - starts


def _host_ints(x, what: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.dim() != 1:
            raise TypeError(f"{what}: expected a 1-D integer tensor or a list of ints, got {x.dtype} {tuple(x.shape)}")
        return x.tolist()
    try:
        out = [int(v) for v in x]
    except (TypeError, ValueError):
        raise TypeError(f"{what}: expected a 1-D integer tensor or a list of ints, got {type(x).__name__}") from None
    return out
