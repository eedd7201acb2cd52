"""Batches: tokenized features -> the tensors of one forward, padded, packed or shared-prefix (the layouts:
docs/contract.md#batch-layouts).

Rows are ordered field-major, ``[field0 of every example; field1 of every example; ...]``: for T-SPIN
``[real; generated; proto]``, the order the losses split with ``chunk(3)``. Batches are built on the CPU from
Python lists, so this is where token ids and labels are checked: it costs a pass over lists already in hand, where
the same check on device tensors would stall the GPU stream.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from tspin_kernels.integrations import VARLEN_SDPA, AttentionSegments, SharedPrefixBatch, build_shared_prefix_batch
from tspin_kernels.integrations.triplets import field_major, pack_rows, pad_rows

from .choices import LAYOUTS
from .data import IGNORE_INDEX
from .methods import LOSS_FIELDS, loss_of


@dataclass
class Batch:
    input_ids: torch.Tensor | None  # (R, T) padded, or (1, N) packed; None for shared_prefix (see `shared`)
    labels: torch.Tensor | None  # same shape as input_ids, HF style (shift happens in the kernel)
    attention_mask: torch.Tensor | None  # (R, T); None when packed (position_ids delimit sequences)
    position_ids: torch.Tensor | None  # (1, N) packed, restarting at 0 per sequence
    cu_seqlens: torch.Tensor | None  # (R+1,) int32 packed offsets
    num_examples: int
    num_tokens: int  # counted (response) tokens
    num_input_tokens: int  # tokens of the sequences (padding excluded; a shared prompt counted per response)
    ref_logps: torch.Tensor | None = None  # (R,) float32 in row order (SPIN)
    shared: SharedPrefixBatch | None = None  # shared_prefix: rows, positions and counted triples
    # per sequence (row order) the positions the kernels count: labels after the first that are not ignored.
    # Known here for free; the fused loss path plans its chunks from them instead of reading them from the device
    seq_counts: tuple[int, ...] = ()
    # packed: what each token attends to, on the host, for attn_implementation="varlen_sdpa" (no device read-back)
    segments: AttentionSegments | None = None

    def to(self, device) -> Batch:
        movable = (torch.Tensor, SharedPrefixBatch)  # the segments stay on the host
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, movable) else t
        return Batch(**{k: move(v) for k, v in self.__dict__.items()})


def fields_for(method: str, no_history: bool = False) -> tuple[str, ...]:
    """The rows of one example of ``method`` (a ``config.method``). T-SPIN without the history term never reads
    y0: its examples are the pairs (y, y')."""
    return LOSS_FIELDS[loss_of(method, no_history)]


def rows_layout(layout: str, num_fields: int) -> str:
    """The layout :func:`collate` gives examples of ``num_fields`` rows: ``shared_prefix`` with one response per
    prompt has no prefix to share, and is ``packed``."""
    return "packed" if layout == "shared_prefix" and num_fields == 1 else layout


def count_tokens(features: list[dict], fields: tuple[str, ...]) -> tuple[int, int]:
    """(counted response tokens, input tokens) of ``features``' ``fields``."""
    seqs = field_major(features, fields)
    return sum(sum(1 for x in lab if x != IGNORE_INDEX) for _, lab in seqs), sum(len(s) for s, _ in seqs)


def _check(seqs: list, pad_token_id: int, vocab_size: int | None) -> None:
    for i, (ids, labels) in enumerate(seqs):
        if not ids or len(ids) != len(labels):
            raise ValueError(f"features: row {i} has {len(ids)} input ids and {len(labels)} labels; expected the "
                             "same non-zero number")
        if vocab_size is not None:
            bad = [t for t in ids if not 0 <= t < vocab_size] + [
                t for t in labels if t != IGNORE_INDEX and not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"features: row {i} holds token id {bad[0]} outside [0, {vocab_size}) (labels may "
                                 f"also be {IGNORE_INDEX}); does the tokenizer belong to this model?")
    if vocab_size is not None and not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id: {pad_token_id} is outside the model's vocabulary [0, {vocab_size})")


def collate(features: list[dict], fields: tuple[str, ...], pad_token_id: int, layout: str = "padded", *,
            vocab_size: int | None = None, attn_implementation: str | None = None) -> Batch:
    """One batch of ``features`` (from :func:`tspin.data.build_features`): every example's ``fields`` as rows.

    With ``vocab_size`` every token id and label is checked to lie in the model's vocabulary (labels may be -100).
    ``shared_prefix`` puts each example's ``fields`` in one sequence, the prompt once
    (:func:`tspin_kernels.integrations.build_shared_prefix_batch`); with a single field it is ``packed``.
    ``attn_implementation``: the model's; under ``varlen_sdpa`` and ``flex_attention``, whose cost does not grow
    with the row, the shared-prefix examples go into one row without padding (else rows of the longest example).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    seqs = field_major(features, fields)
    if not seqs:
        raise ValueError("features: a batch needs at least one example")
    _check(seqs, pad_token_id, vocab_size)
    num_tokens, num_input_tokens = count_tokens(features, fields)
    # labels[0] never counts: position t predicts labels[t + 1] (the kernels' shift, the shared prefix's rule)
    seq_counts = tuple(sum(1 for x in lab[1:] if x != IGNORE_INDEX) for _, lab in seqs)
    counts = dict(num_examples=len(features), num_tokens=num_tokens, num_input_tokens=num_input_tokens,
                  seq_counts=seq_counts)
    ref = None
    if all("ref" in feat for feat in features):
        ref = torch.tensor([feat["ref"][f] for f in fields for feat in features], dtype=torch.float32)
    layout = rows_layout(layout, len(fields))
    if layout == "shared_prefix":
        one_row = attn_implementation in (VARLEN_SDPA, "flex_attention")
        shared = build_shared_prefix_batch([[feat[f] for f in fields] for feat in features],
                                           pad_token_id=pad_token_id, ignore_index=IGNORE_INDEX,
                                           max_row_tokens=sys.maxsize if one_row else None)
        return Batch(None, None, None, None, None, **counts, ref_logps=ref, shared=shared)
    if layout == "packed":
        ids, labels, positions, cu_seqlens = pack_rows(seqs)
        segments = AttentionSegments.packed([len(s) for s, _ in seqs])
        return Batch(ids, labels, None, positions, cu_seqlens, **counts, ref_logps=ref, segments=segments)
    ids, labels, mask = pad_rows(seqs, pad_token_id)
    return Batch(ids, labels, mask, None, None, **counts, ref_logps=ref)
