"""Public functional API: per-sequence log-probs and the T-SPIN / SPIN losses on top of them."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _device
from ._inputs import check_inputs, check_scalar, compact
from .reference import ChunkedSequenceLogps, naive_sequence_logps


class TSPINOutput(NamedTuple):
    loss: torch.Tensor  # 0-d
    real_logps: torch.Tensor  # (B,) float32
    generated_logps: torch.Tensor
    proto_logps: torch.Tensor


class SPINOutput(NamedTuple):
    loss: torch.Tensor
    real_logps: torch.Tensor
    generated_logps: torch.Tensor


def sequence_logps(hidden, weight, labels, *, bias=None, cu_seqlens=None, ignore_index: int = -100,
                   shift: bool = False, average: bool = False, impl: str = "auto",
                   check_finite: bool = False) -> torch.Tensor:
    """Sum (or mean) of target-token log-probs per sequence, from hidden states and the LM-head weight.

    Args:
        hidden: ``(R, T, D)``, or packed ``(N, D)`` with ``cu_seqlens``; bf16, fp16 or fp32.
        weight: ``(V, D)`` LM-head weight, same dtype as ``hidden``.
        labels: ``(R, T)`` / ``(N,)`` integer targets aligned with ``hidden`` (``labels[t]`` is predicted from
            ``hidden[t]``), or Hugging Face style with ``shift=True``. ``ignore_index`` positions do not count.
        bias: optional ``(V,)``.
        cu_seqlens: ``(S+1,)`` int offsets of the packed sequences (non-decreasing, 0 to N).
        average: mean instead of sum over counted tokens (0 for a sequence with none).
        impl: ``"triton"``, ``"torch"`` (chunked, bounded memory), ``"reference"`` (full logits) or ``"auto"``
            (triton on CUDA, torch elsewhere; ``TSPIN_IMPL`` overrides it).
        check_finite: raise if ``hidden`` holds NaN/Inf (costs one reduction).

    Returns:
        float32 tensor of shape ``(S,)``, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    hidden, weight, bias = _autocast(hidden, weight, bias)
    check_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index, check_finite)
    impl = _device.resolve_impl(impl, hidden)
    if impl == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden: impl='triton' expects bfloat16, float16 or float32, got torch.float64")
    if impl == "reference":
        return naive_sequence_logps(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens,
                                    ignore_index=ignore_index, shift=shift, average=average)
    c = compact(hidden, labels, cu_seqlens, ignore_index, shift, average)
    if impl == "triton":
        from .functions import TritonSequenceLogps  # imports triton lazily: the torch path works without it

        fn = TritonSequenceLogps
    else:
        fn = ChunkedSequenceLogps
    return fn.apply(c.hidden2d, weight, bias, c.row_idx, c.target, c.seq_id, c.token_scale, c.num_seqs)


def _autocast(hidden, weight, bias):
    """Under torch.autocast, compute in the autocast dtype as F.linear would (fp32 master weights, bf16 activations)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return hidden, weight, bias
    dev = hidden.device.type
    if not torch.is_autocast_enabled(dev) or not hidden.is_floating_point():
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    return cast(hidden), cast(weight), cast(bias)


def tspin_loss_from_logps(real, generated, proto, *, alpha: float = 1.0, beta: float = 0.1) -> torch.Tensor:
    """T-SPIN loss from per-sequence log-probs: l(a*(real-gen)) + b*l(a*(gen-proto)), mean over triplets."""
    current = alpha * (real - generated)
    history = alpha * (generated - proto)
    return (-F.logsigmoid(current) - beta * F.logsigmoid(history)).mean()


def spin_loss_from_logps(real, generated, ref_real, ref_generated, *, beta: float = 0.1) -> torch.Tensor:
    """SPIN loss: l(beta*[(real - ref_real) - (gen - ref_gen)]), mean over pairs."""
    return -F.logsigmoid(beta * ((real - ref_real) - (generated - ref_generated))).mean()


def _rows(hidden, cu_seqlens) -> int:
    return hidden.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def tspin_loss(hidden, weight, labels, *, alpha: float = 1.0, beta: float = 0.1, **options) -> TSPINOutput:
    """T-SPIN loss over 3B rows ordered ``[real_0..real_{B-1}, generated_0.., proto_0..]``.

    ``options`` are those of :func:`sequence_logps` (bias, cu_seqlens, ignore_index, shift, average, impl).
    """
    alpha, beta = check_scalar("alpha", alpha), check_scalar("beta", beta)
    if isinstance(hidden, torch.Tensor) and hidden.dim() in (2, 3):
        rows = _rows(hidden, options.get("cu_seqlens"))
        if rows == 0 or rows % 3:
            raise ValueError(f"hidden: tspin_loss needs 3B rows [real; generated; proto] with B>=1, got {rows} rows")
    logps = sequence_logps(hidden, weight, labels, **options)
    real, generated, proto = logps.chunk(3)
    return TSPINOutput(tspin_loss_from_logps(real, generated, proto, alpha=alpha, beta=beta), real, generated, proto)


def spin_loss(hidden, weight, labels, ref_logps, *, beta: float = 0.1, **options) -> SPINOutput:
    """SPIN loss over 2B rows ``[real; generated]``; ``ref_logps`` (2B,) are the frozen start-of-iteration log-probs."""
    beta = check_scalar("beta", beta)
    if isinstance(hidden, torch.Tensor) and hidden.dim() in (2, 3):
        rows = _rows(hidden, options.get("cu_seqlens"))
        if rows == 0 or rows % 2:
            raise ValueError(f"hidden: spin_loss needs 2B rows [real; generated] with B>=1, got {rows} rows")
        if not isinstance(ref_logps, torch.Tensor) or tuple(ref_logps.shape) != (rows,):
            got = tuple(ref_logps.shape) if isinstance(ref_logps, torch.Tensor) else type(ref_logps).__name__
            raise ValueError(f"ref_logps: expected a tensor of shape ({rows},) in the same row order, got {got}")
    logps = sequence_logps(hidden, weight, labels, **options)
    real, generated = logps.chunk(2)
    ref = ref_logps.detach().float().to(logps.device)
    ref_real, ref_generated = ref.chunk(2)
    return SPINOutput(spin_loss_from_logps(real, generated, ref_real, ref_generated, beta=beta), real, generated)
