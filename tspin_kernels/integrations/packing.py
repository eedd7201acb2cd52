"""Padding-free batches for Hugging Face causal LMs: one row of concatenated sequences, ``position_ids`` restarting
at 0 per sequence, ``cu_seqlens`` offsets for the kernels, and the attention implementation that runs them at the
cost of their sequences."""

from __future__ import annotations

import torch

from .attention_segments import VARLEN_SDPA

__all__ = ["packed_position_ids", "pack_padded", "packing_attn_implementation"]


def packed_position_ids(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``(N,)`` int64 positions restarting at 0 at every offset of ``cu_seqlens``. Pass ``total`` (= N, known from
    the batch's shape) to skip reading ``cu_seqlens[-1]`` back from the device."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    n = int(cu[-1]) if total is None else total
    return torch.arange(n, device=cu.device) - torch.repeat_interleave(cu[:-1], lengths, output_size=n)


def pack_padded(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
    """Right-padded ``(R, T)`` rows -> one packed row: ``(input_ids (1,N), labels (1,N), position_ids (1,N),
    cu_seqlens (R+1,) int32)``. Padding (``attention_mask == 0``) is dropped; rows must be right-padded."""
    if input_ids.dim() != 2 or labels.shape != input_ids.shape or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids, labels, attention_mask: expected the same (R, T) shape, got {tuple(input_ids.shape)}, "
            f"{tuple(labels.shape)}, {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    right_padded = (keep == (torch.arange(keep.shape[1], device=keep.device) < lengths[:, None])).all()
    if not bool(right_padded):
        raise ValueError("attention_mask: pack_padded expects right-padded rows (ones first, then zeros)")
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = lengths.cumsum(0)
    return input_ids[keep][None], labels[keep][None], packed_position_ids(cu)[None], cu


def packing_attn_implementation(device: torch.device | str | None = None) -> str:
    """The attention implementation whose cost on a packed row is the sum of its sequences' attention, not the
    square of the row: ``"flash_attention_2"`` where flash-attn's varlen kernel can run (CUDA + package
    installed), else ``"varlen_sdpa"`` (:mod:`tspin_kernels.integrations.varlen_sdpa`: sdpa per bucket of equal
    sequences; registered with transformers when ``tspin_kernels.integrations`` is imported).

    Pass it as ``attn_implementation=`` to ``from_pretrained`` / ``from_config`` for padding-free batches.
    """
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        try:
            import flash_attn  # noqa: F401
        except Exception:
            return VARLEN_SDPA
        return "flash_attention_2"
    return VARLEN_SDPA
