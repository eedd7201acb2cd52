"""Shared-prefix batches: every example's common prefix goes through the backbone once for all its responses.

A T-SPIN triplet is one prompt with three responses, a SPIN pair one prompt with two. The padded and packed
layouts run the prompt once per response; here each example becomes one sequence

    [shared prefix, response 1, response 2, ..., response k]

and several examples share a row. The shared prefix is the longest common prefix of the example's tokenized
sequences (prompt + response each, tokenized as the padded layout tokenizes them), so it is exact whatever the
tokenizer does at the prompt/response boundary, and a shared first response token is shared too.

- Positions: ``0..P-1`` on the prefix; every response continues from ``P`` (``P`` is the prefix length), exactly
  the positions its tokens have in its own padded row.
- Attention: causal on the prefix; a response token sees the prefix and the earlier tokens of its own response,
  nothing of the other responses or of other examples. Together with the positions, every response token's hidden
  state is the one the padded layout computes (up to floating-point summation order).
- Counted positions: response token ``t`` of a sequence is predicted from the position holding token ``t - 1`` of
  that sequence. For the first token after the prefix that is the last prefix position, for every response: one
  hidden row serves up to ``k`` targets in ``k`` sequences. They are given to the kernel as
  :class:`tspin_kernels.CountedPositions`, whose gradient sums over the repeats.

The masks come in the forms the attention implementations take: :class:`AttentionSegments` for ``varlen_sdpa``
(one sdpa per bucket of equal pieces -- prefixes, responses with their prefix --, nothing of size ``T**2``: put
all examples in one row, no padding), a 4D ``(rows, 1, T, T)`` mask for ``sdpa`` and ``eager`` (a dense mask:
memory and attention work grow with ``T**2`` per row, so rows are kept short by default), and a FlexAttention
``BlockMask`` for ``flex_attention`` (the fully masked blocks cost nothing there). Flash-attention kernels cannot
take an arbitrary mask and are refused, as are, except under ``varlen_sdpa`` (which measures the window in each
response's own positions), sliding-window models whose window is shorter than a sequence of the batch (the
window would be measured across the other responses). Versions: transformers 4.51-4.52 take a 4D mask in each
model's ``_update_causal_mask`` (additive float for sdpa/eager) and a ``BlockMask`` for flex; from 4.53
``masking_utils`` returns any 4D tensor or ``BlockMask`` as it is.
"""

from __future__ import annotations

import importlib.util
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn

from ..positions import CountedPositions
from .attention_segments import VARLEN_SDPA, AttentionSegments
from .hf import attention_implementation, causal_lm_sequence_logps, unwrap_causal_lm

__all__ = ["SharedPrefixBatch", "build_shared_prefix_batch", "shared_prefix_attention_mask",
           "shared_prefix_sequence_logps", "SHARED_PREFIX_ATTENTION"]

# attention implementations that take the layout's mask (varlen_sdpa: as AttentionSegments)
SHARED_PREFIX_ATTENTION = (VARLEN_SDPA, "sdpa", "eager", "flex_attention")


@dataclass
class SharedPrefixBatch:
    """Rows of shared-prefix sequences and what counts in them. Sequences (the log-prob vector's order) are
    response-major: ``[response 1 of every example; response 2 of every example; ...]``, the kernels' order
    ``[real; generated; proto]`` when the responses are given in that order."""

    input_ids: torch.Tensor  # (R, T) int64; padding after each row's last example
    position_ids: torch.Tensor  # (R, T) int64
    example_ids: torch.Tensor  # (R, T) int64: the example each token belongs to, -1 on padding
    branch_ids: torch.Tensor  # (R, T) int64: 0 on an example's shared prefix, j on its response j (1..k), -1 padding
    positions: CountedPositions  # rows index the (R*T, D) hidden states
    num_examples: int
    num_responses: int
    prefix_lengths: tuple[int, ...]  # per example
    response_lengths: tuple[tuple[int, ...], ...]  # per example, per response: tokens after the prefix
    segments: AttentionSegments  # host-side: what each token attends to, for attn_implementation="varlen_sdpa"

    @property
    def num_sequences(self) -> int:
        return self.num_examples * self.num_responses

    @property
    def backbone_tokens(self) -> int:
        """Tokens the backbone runs, padding included (``R * T``)."""
        return self.input_ids.numel()

    @property
    def sequence_tokens(self) -> int:
        """Tokens of the examples' sequences (no padding): the prefix once, then every response."""
        return sum(self.prefix_lengths) + sum(sum(r) for r in self.response_lengths)

    def to(self, device, non_blocking: bool = False) -> SharedPrefixBatch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("input_ids", "position_ids", "example_ids", "branch_ids"):
            kw[name] = kw[name].to(device, non_blocking=non_blocking)
        kw["positions"] = self.positions.to(device, non_blocking=non_blocking)
        return SharedPrefixBatch(**kw)


def _as_ints(x, what: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"{what}: expected a 1-D integer tensor or a list of ints, got {x.dtype} "
                            f"{tuple(x.shape)}")
        return x.tolist()
    if isinstance(x, np.ndarray):
        return _as_ints(torch.from_numpy(x), what)
    if not isinstance(x, Sequence) or isinstance(x, (str, bytes)) or \
            not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in x):
        raise TypeError(f"{what}: expected a list of ints or a 1-D integer tensor, got {type(x).__name__}")
    return [int(v) for v in x]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def _rows_of(lengths: list[int], max_row_tokens: int) -> list[list[int]]:
    """Examples to rows: first fit, longest first, at most ``max_row_tokens`` per row (a longer example gets a row
    of its own). Rows keep their examples in input order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for e in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[e] <= free:
                rows[r].append(e)
                room[r] -= lengths[e]
                break
        else:
            rows.append([e])
            room.append(max_row_tokens - lengths[e])
    return [sorted(r) for r in rows]


def build_shared_prefix_batch(examples, *, pad_token_id: int = 0, ignore_index: int = -100,
                              max_row_tokens: int | None = None) -> SharedPrefixBatch:
    """One :class:`SharedPrefixBatch` from tokenized examples (on the CPU; move it with ``.to(device)``).

    Args:
        examples: per example, its ``k`` sequences (the same ``k`` for every example; 3 for a T-SPIN triplet
            ``[real, generated, proto]``, 2 for a SPIN pair), each an ``(input_ids, labels)`` pair of equal-length
            int lists or 1-D tensors, Hugging Face style: ``labels[t]`` is the token predicted from position
            ``t - 1`` (``labels[0]`` never counts), ``ignore_index`` on the prompt. Exactly what a padded row holds.
        pad_token_id: the token filling rows after their last example (never attended to, never counted).
        max_row_tokens: examples are packed into rows of at most this many tokens (first fit, longest first; an
            example longer than this gets a row of its own). ``None``: the longest example's length, which keeps
            dense-mask attention work per row no larger than one example's. Pass a large value for one row, no
            padding (what ``varlen_sdpa`` and a FlexAttention ``BlockMask`` handle best).
    """
    if not isinstance(examples, Sequence) or isinstance(examples, (str, bytes)) or not examples:
        raise ValueError("examples: expected a non-empty list of examples, each a list of (input_ids, labels) pairs")
    if max_row_tokens is not None and (isinstance(max_row_tokens, bool) or
                                       not isinstance(max_row_tokens, numbers.Integral) or max_row_tokens < 1):
        raise ValueError(f"max_row_tokens: expected a positive int or None, got {max_row_tokens!r}")
    B = len(examples)
    k = None
    ids_of, labels_of = [], []
    for e, ex in enumerate(examples):
        if not isinstance(ex, Sequence) or isinstance(ex, (str, bytes)) or not ex:
            raise ValueError(f"examples[{e}]: expected a non-empty list of (input_ids, labels) pairs")
        if k is None:
            k = len(ex)
        elif len(ex) != k:
            raise ValueError(f"examples[{e}]: expected {k} sequences like examples[0], got {len(ex)}")
        ids_e, lab_e = [], []
        for j, pair in enumerate(ex):
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"examples[{e}][{j}]: expected an (input_ids, labels) pair")
            ids = _as_ints(pair[0], f"examples[{e}][{j}] input_ids")
            lab = _as_ints(pair[1], f"examples[{e}][{j}] labels")
            if len(ids) != len(lab):
                raise ValueError(f"examples[{e}][{j}]: labels has {len(lab)} entries, input_ids {len(ids)}")
            if not ids:
                raise ValueError(f"examples[{e}][{j}]: empty sequence")
            ids_e.append(ids)
            lab_e.append(lab)
        ids_of.append(ids_e)
        labels_of.append(lab_e)

    prefix = [_common_prefix(ids_e) for ids_e in ids_of]
    resp_len = [tuple(len(s) - p for s in ids_e) for ids_e, p in zip(ids_of, prefix)]
    lengths = [p + sum(r) for p, r in zip(prefix, resp_len)]
    row_members = _rows_of(lengths, max(lengths) if max_row_tokens is None else max_row_tokens)
    R, T = len(row_members), max(sum(lengths[e] for e in m) for m in row_members)

    input_ids = np.full((R, T), pad_token_id, dtype=np.int64)
    position_ids = np.zeros((R, T), dtype=np.int64)
    example_ids = np.full((R, T), -1, dtype=np.int64)
    branch_ids = np.full((R, T), -1, dtype=np.int64)
    rows, targets, seq_ids, pieces = [], [], [], []
    for r, members in enumerate(row_members):
        start = r * T  # flat index of this row's first token
        off = 0
        for e in members:
            P, seqs, labs = prefix[e], ids_of[e], labels_of[e]
            pieces.append((start + off, P, 0, 0))
            sl = slice(off, off + lengths[e])
            input_ids[r, sl] = seqs[0][:P] + [t for s in seqs for t in s[P:]]
            position_ids[r, sl] = list(range(P)) + [t for s in seqs for t in range(P, len(s))]
            example_ids[r, sl] = e
            branch_ids[r, sl] = [0] * P + [j + 1 for j, s in enumerate(seqs) for _ in range(P, len(s))]
            resp_start = off + P
            for j, (s, lab) in enumerate(zip(seqs, labs)):
                lab_np = np.asarray(lab, dtype=np.int64)
                t = np.nonzero(lab_np[1:] != ignore_index)[0] + 1  # counted label positions (t >= 1)
                src = t - 1  # the position of sequence j that predicts label t
                flat = np.where(src < P, start + off + src, start + resp_start + (src - P))
                rows.append(flat)
                targets.append(lab_np[t])
                seq_ids.append(np.full(t.size, j * B + e, dtype=np.int64))
                pieces.append((start + resp_start, len(s) - P, start + off, P))
                resp_start += len(s) - P
            off += lengths[e]
        pieces.extend((start + t, 1, 0, 0) for t in range(off, T))  # padding sees itself only
    cat = lambda parts: torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)  # noqa: E731
    positions = CountedPositions(cat(rows), cat(targets), cat(seq_ids), k * B)
    return SharedPrefixBatch(
        torch.from_numpy(input_ids), torch.from_numpy(position_ids), torch.from_numpy(example_ids),
        torch.from_numpy(branch_ids), positions, B, k, tuple(prefix), tuple(resp_len),
        AttentionSegments(pieces, R * T))


# ---------------------------------------------------------------------------------------------------------------
# Attention masks
# ---------------------------------------------------------------------------------------------------------------


def _visible(ex_q, br_q, q, ex_kv, br_kv, kv):
    """The rule, on broadcastable tensors: same example, not in the future, and the key is on the shared prefix or
    on the query's own response. A padding token (example -1) sees itself only, so no softmax row is empty."""
    same = (ex_q == ex_kv) & (ex_q >= 0) & (kv <= q) & ((br_kv == 0) | (br_kv == br_q))
    return same | (kv == q)


def _dense_visible(batch: SharedPrefixBatch) -> torch.Tensor:
    ex, br = batch.example_ids, batch.branch_ids
    idx = torch.arange(ex.shape[1], device=ex.device)
    return _visible(ex[:, :, None], br[:, :, None], idx[None, :, None], ex[:, None, :], br[:, None, :],
                    idx[None, None, :])


def _attn_implementation(model_or_name) -> tuple[str, object]:
    if isinstance(model_or_name, str):
        return model_or_name, None
    return attention_implementation(model_or_name), unwrap_causal_lm(model_or_name).config


def _check_window(config, batch: SharedPrefixBatch, *, sliding: bool = True) -> None:
    """A sliding window (or attention chunks) shorter than a sequence would cut differently here than in a padded
    row, where the other responses are not in between; refuse rather than differ. ``sliding=False``: the
    attention applies the window in each response's own positions (varlen_sdpa); chunks are still refused."""
    if config is None:
        return
    window = getattr(config, "sliding_window", None) if sliding else None
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(config, "layer_types", None)
    if window is not None and layer_types is not None and not any("sliding" in str(t) for t in layer_types):
        window = None
    longest = max(p + max(r) for p, r in zip(batch.prefix_lengths, batch.response_lengths))
    for name, value in (("sliding_window", window), ("attention_chunk_size", getattr(config, "attention_chunk_size",
                                                                                        None))):
        if isinstance(value, int) and longest > value:
            raise NotImplementedError(
                f"model: config.{name}={value} is shorter than the longest sequence of this batch ({longest} "
                "tokens); the shared-prefix layout does not reproduce windowed attention. Use layout 'padded' or "
                "'packed', or sequences of at most that length")


def shared_prefix_attention_mask(batch: SharedPrefixBatch, model, *, dtype: torch.dtype | None = None):
    """The attention mask of ``batch`` in the form ``model``'s attention implementation takes.

    ``model``: the causal LM (or a wrapper of it; its ``config._attn_implementation`` decides), or the name of an
    implementation. ``varlen_sdpa``: ``batch.segments`` (host-side; no mask is built). ``sdpa``: a boolean
    ``(R, 1, T, T)`` mask (transformers >= 4.53; an additive float mask in ``dtype`` before). ``eager``: an
    additive float ``(R, 1, T, T)`` mask in ``dtype`` (default: the input embeddings' dtype, else float32): 0 where
    a query may attend, the dtype's minimum elsewhere. ``flex_attention``: a FlexAttention ``BlockMask``. Built on
    ``batch``'s device, without host syncs (the BlockMask excepted: its block counts are computed there).
    """
    name, config = _attn_implementation(model)
    if name not in SHARED_PREFIX_ATTENTION:
        raise ValueError(
            f"attn_implementation={name!r}: the shared-prefix layout needs an attention that takes an arbitrary "
            f"mask, one of {SHARED_PREFIX_ATTENTION} (flash-attention kernels only know causal and varlen-packed "
            "masks). Load the model with attn_implementation='varlen_sdpa', 'sdpa' or 'flex_attention', or use "
            "layout 'packed'")
    _check_window(config, batch, sliding=name != VARLEN_SDPA)
    if name == VARLEN_SDPA:
        return batch.segments
    if name == "flex_attention":
        return _block_mask(batch)
    visible = _dense_visible(batch)[:, None]
    if name == "sdpa" and importlib.util.find_spec("transformers.masking_utils") is not None:
        return visible
    if dtype is None:
        emb = unwrap_causal_lm(model).get_input_embeddings() if not isinstance(model, str) else None
        dtype = emb.weight.dtype if emb is not None and emb.weight.is_floating_point() else torch.float32
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)


def _block_mask(batch: SharedPrefixBatch):
    from torch.nn.attention.flex_attention import create_block_mask

    ex, br = batch.example_ids, batch.branch_ids

    def mask_mod(b, h, q, kv):
        return _visible(ex[b, q], br[b, q], q, ex[b, kv], br[b, kv], kv)

    R, T = ex.shape
    return create_block_mask(mask_mod, R, None, T, T, device=ex.device)


# ---------------------------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------------------------


def shared_prefix_sequence_logps(model: nn.Module, batch: SharedPrefixBatch, *, attention_mask=None,
                                 average: bool = False, impl: str = "auto", backward: str | None = None,
                                 grad_filter_eps: float | None = None, tiles: dict | None = None,
                                 chunk_elements: int | None = None, validate: bool = True) -> torch.Tensor:
    """Per-sequence sum (or mean) of response-token log-probs of a Hugging Face causal LM on a shared-prefix batch,
    float32 ``(k * B,)`` in ``batch``'s response-major order; equal to the padded layout's values.

    ``model``: a ``*ForCausalLM`` (or PEFT / DDP wrapper); under FSDP2 call the wrapped
    :class:`~tspin_kernels.integrations.CausalLMLogps` with ``(batch.input_ids, batch.positions, mask,
    batch.position_ids)`` instead. ``attention_mask``: a mask from :func:`shared_prefix_attention_mask` (built
    here when None). The other options are :func:`tspin_kernels.sequence_logps`'s.
    """
    if not isinstance(batch, SharedPrefixBatch):
        raise TypeError(f"batch: expected a SharedPrefixBatch (build_shared_prefix_batch), got {type(batch).__name__}")
    if attention_mask is None:
        attention_mask = shared_prefix_attention_mask(batch, model)
    return causal_lm_sequence_logps(
        model, batch.input_ids, batch.positions, attention_mask=attention_mask, position_ids=batch.position_ids,
        average=average, impl=impl, backward=backward, grad_filter_eps=grad_filter_eps, tiles=tiles,
        chunk_elements=chunk_elements, validate=validate)
