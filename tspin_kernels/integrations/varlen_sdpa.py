"""``attn_implementation="varlen_sdpa"``: packed and shared-prefix rows at the cost of their sequences' attention.

With ``sdpa`` or ``eager`` a packed row of sequences is one attention over the whole row behind a block-diagonal
mask that transformers builds from ``position_ids``: work and mask memory grow with ``(sum of lengths)**2``. The
varlen kernel of flash-attn avoids that, but it is not installed everywhere (no wheels for many setups, never on
a CPU), and FlexAttention has no backward on the CPU (torch 2.13). This attention implementation, registered
with transformers' ``AttentionInterface`` (and its mask registry), runs PyTorch's
``scaled_dot_product_attention`` once per bucket of equal-shape pieces
(:class:`~tspin_kernels.integrations.AttentionSegments`): sequences of one length go together, causal, with no
mask at all; shared-prefix responses see their prefix through a mask of their own size. Nothing of size
``(sum of lengths)**2`` is ever built.

Where the pieces come from, in this order: the ``attention_segments`` keyword (what
:func:`~tspin_kernels.integrations.causal_lm_sequence_logps` passes: built on the host, nothing is read back from
the device), transformers' flash-attention keywords ``cu_seq_lens_q`` / ``cu_seq_lens_k``, or ``position_ids``
restarting per sequence (TRL's and transformers' padding-free collators). The last two are read on the host once
per forward (a device sync on a GPU; every layer reuses it). Everything else -- padded rows with a padding mask,
a KV cache, decoding, bidirectional layers, attention chunks -- is plain ``sdpa``, with the mask ``sdpa`` would
get. Sliding-window layers (the ``sliding_window`` keyword transformers hands to every attention) get the window
inside each piece. Logit soft-capping and attention sinks, which torch's sdpa lacks, are refused.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .attention_segments import VARLEN_SDPA, AttentionSegments

__all__ = ["VARLEN_SDPA", "varlen_sdpa_attention", "register_varlen_sdpa"]



# ---------------------------------------------------------------------------------------------------------------
# Where the pieces come from
# ---------------------------------------------------------------------------------------------------------------

class _LastRead:
    """The pieces read from one tensor (``cu_seq_lens_q`` or ``position_ids``): every layer of a forward gets the
    same tensor object, so one read serves them all."""

    def __init__(self):
        self.ref, self.key, self.segments = None, None, None

    def get(self, tensor: torch.Tensor, key: tuple, build) -> AttentionSegments:
        key = (tensor._version, *key)
        if self.ref is None or self.ref() is not tensor or self.key != key:
            self.segments = build()
            self.ref, self.key = weakref.ref(tensor), key
        return self.segments


_last_read = _LastRead()


def _segments_from_keywords(kwargs: dict, rows: int, tokens: int) -> AttentionSegments | None:
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and rows == 1:
        if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
            raise NotImplementedError("varlen_sdpa: cu_seq_lens_k must equal cu_seq_lens_q (self-attention)")
        segments = _last_read.get(cu_q, ("cu",), lambda: AttentionSegments.from_cu_seqlens(cu_q))
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is None or position_ids.shape[-1] != tokens:
            return None

        def build():
            pos = position_ids.reshape(-1, tokens)
            return AttentionSegments.from_position_ids(pos if pos.shape[0] == rows else pos.expand(rows, -1))

        segments = _last_read.get(position_ids, ("pos", rows, tokens), build)
    if segments.tokens != rows * tokens:
        raise ValueError(f"varlen_sdpa: the sequence offsets cover {segments.tokens} tokens, the rows hold "
                         f"{rows} x {tokens}")
    return segments


# ---------------------------------------------------------------------------------------------------------------
# The attention
# ---------------------------------------------------------------------------------------------------------------

_masks: dict = {}
_MASK_CACHE_ELEMENTS = 1 << 25  # 32 MiB of booleans: every layer of a batch reuses them, shapes vary with the data


def _piece_mask(q_len: int, prefix_len: int, window: int | None, device) -> torch.Tensor:
    """Which of ``prefix_len + q_len`` keys each of ``q_len`` queries sees: the whole prefix and itself causally
    (key ``c`` at position ``c``, query ``i`` at ``prefix_len + i``), within ``window`` positions if given."""
    key = (q_len, prefix_len, window, str(device))
    if key not in _masks:
        q = torch.arange(q_len, device=device)[:, None] + prefix_len
        kv = torch.arange(prefix_len + q_len, device=device)[None, :]
        mask = kv <= q
        if window is not None:
            mask &= q - kv < window
        if sum(m.numel() for m in _masks.values()) + mask.numel() > _MASK_CACHE_ELEMENTS:
            _masks.clear()
        _masks[key] = mask
    return _masks[key]


def _run_pieces(segments: AttentionSegments, query, key, value, *, dropout: float, scaling, window):
    B, H, T, D = query.shape
    Hk, Dv = key.shape[1], value.shape[-1]
    flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], x.shape[-1])  # noqa: E731 (token-major)
    q, k, v = flat(query), flat(key), flat(value)
    per_bucket, inverse = segments.device_indices(query.device)
    outs = []
    for b, (q_index, kv_index) in zip(segments.buckets(), per_bucket):
        n, L, P = b.n, b.q_len, b.prefix_len
        if q_index is None:  # back-to-back pieces: a view of the row
            span = slice(b.start, b.start + n * L)
            qb, kb, vb = (x[span].view(n, L, *x.shape[1:]) for x in (q, k, v))
        else:
            qb = q.index_select(0, q_index).view(n, L, H, D)
            idx = q_index if kv_index is None else kv_index
            kb = k.index_select(0, idx).view(n, P + L, Hk, D)
            vb = v.index_select(0, idx).view(n, P + L, Hk, Dv)
        plain = P == 0 and (window is None or L <= window)  # the flash kernels' is_causal, no mask to read
        out = F.scaled_dot_product_attention(
            qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2),
            attn_mask=None if plain else _piece_mask(L, P, window, query.device), is_causal=plain,
            dropout_p=dropout, scale=scaling, enable_gqa=Hk != H)
        outs.append(out.transpose(1, 2).reshape(n * L, H, Dv))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if inverse is not None:
        out = out.index_select(0, inverse)
    return out.view(B, T, H, Dv)


def varlen_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                          dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                          attention_segments: AttentionSegments | None = None, **kwargs):
    """transformers' attention-function signature: ``(B, H, T, D)`` query / key / value -> ``((B, T, H, D), None)``.

    ``attention_segments``: the pieces of the rows (:class:`AttentionSegments`); without them they are read from
    ``cu_seq_lens_q`` or ``position_ids`` where the rows need it, else this is ``sdpa``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    B, _, T, _ = query.shape
    self_attention = key.shape[2] == T and T > 1 and causal
    if attention_mask is not None or not self_attention:
        if attention_segments is not None:
            raise ValueError("attention_segments: they describe causal self-attention over whole rows; this layer "
                             f"got a mask (padding, attention chunks) or {key.shape[2]} keys for {T} queries")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    for name in ("softcap", "s_aux"):  # logit soft-capping, attention sinks: not in torch's sdpa
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"varlen_sdpa: this model's attention uses {name}; load it with "
                                      "attn_implementation='eager' or 'flex_attention'")
    segments = attention_segments
    if segments is None:
        segments = _segments_from_keywords(kwargs, B, T) or AttentionSegments.rows(B, T)
    elif segments.tokens != B * T:
        raise ValueError(f"attention_segments: they cover {segments.tokens} tokens, the rows hold {B} x {T}")
    window = kwargs.get("sliding_window")
    window = window if isinstance(window, int) and window > 0 else None
    return _run_pieces(segments, query, key, value, dropout=dropout, scaling=scaling, window=window), None


def _varlen_sdpa_mask(*args, **kwargs):
    """The mask function transformers calls for this implementation: none where the pieces describe the rows
    (causal self-attention over whole rows without padding: plain, packed or shared-prefix), otherwise
    ``sdpa``'s mask (padding, a KV cache with earlier tokens, custom overlays, attention chunks)."""
    from transformers.masking_utils import sdpa_mask

    q_length = kwargs.get("q_length")
    if q_length is None and kwargs.get("cache_position") is not None:  # transformers 4.53-4.5x
        q_length = kwargs["cache_position"].shape[0]
    q_offset = kwargs.get("q_offset", 0)
    chunked = getattr(kwargs.get("config"), "attention_chunk_size", None) is not None  # chunks: not in the pieces
    whole_rows = (kwargs.get("attention_mask") is None and not kwargs.get("use_vmap", False) and not chunked
                  and kwargs.get("kv_length") == q_length and isinstance(q_offset, int) and q_offset == 0
                  and kwargs.get("kv_offset", 0) == 0)
    if whole_rows:
        return None
    return sdpa_mask(*args, **kwargs)


def register_varlen_sdpa() -> str:
    """Register ``"varlen_sdpa"`` with transformers (idempotent; done when ``tspin_kernels.integrations`` is
    imported). Returns the name, for ``from_pretrained(..., attn_implementation=...)``."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53: models build their own 4D mask, which is then passed to sdpa
        return VARLEN_SDPA
    AttentionMaskInterface.register(VARLEN_SDPA, _varlen_sdpa_mask)
    return VARLEN_SDPA
