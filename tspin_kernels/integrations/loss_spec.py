"""The T-SPIN / SPIN loss an LM head computes in its own forward, instead of per-sequence log-probs."""

from __future__ import annotations

import torch

from .._options import check_fused, check_real
from ..functional import spin_loss, tspin_loss, tspin_no_history_loss

__all__ = ["LossSpec", "LOSSES"]

# The losses a head can compute: tspin_kernels.tspin_loss, tspin_no_history_loss and spin_loss
LOSSES = ("tspin", "tspin_no_history", "spin")


class LossSpec:
    """The loss the LM head computes instead of per-sequence log-probs: pass it as ``loss=`` to
    :class:`CausalLMLogps` (or :func:`causal_lm_sequence_logps`, or the fused head itself).

    ``method="tspin"``: :func:`tspin_kernels.tspin_loss` with ``alpha`` / ``beta`` over rows ``[real; generated;
    proto]``; ``method="tspin_no_history"``: :func:`tspin_kernels.tspin_no_history_loss` with ``alpha`` over
    ``[real; generated]`` (T-SPIN without its history term: no ``beta``); ``method="spin"``:
    :func:`tspin_kernels.spin_loss` with ``beta`` (default 0.1) and ``ref_logps`` ``(2B,)`` over ``[real;
    generated]``. ``fused`` / ``seq_counts``: as in those functions (``None`` lets tspin_kernels choose the path,
    fused where it was measured fastest; ``True`` forms the head's and the hidden states' gradients inside the
    head's forward; ``False`` computes log-probs with their own backward and the loss on them; ``seq_counts``,
    each sequence's counted positions on the host, spare the fused path its one read of them). The call returns
    the loss's ``TSPINOutput`` / ``TSPINNoHistoryOutput`` / ``SPINOutput``; on the fused path only ``.loss`` is
    differentiable (the log-probs are detached diagnostics).

    Computing the loss inside the head's forward is what lets it take the fused path under FSDP2 (the head's
    weight is gathered only around that forward) and keeps DDP, LoRA and gradient checkpointing unchanged.

    A plain object on purpose, not a dataclass or a tuple: DDP and FSDP2 walk the tensors inside a forward's
    arguments, and FSDP2's mixed precision casts the floating ones to the parameter dtype; ``ref_logps`` must
    reach the loss in float32.
    """

    __slots__ = ("method", "alpha", "beta", "ref_logps", "seq_counts", "fused")

    def __init__(self, method: str, *, alpha: float = 1.0, beta: float | None = None,
                 ref_logps: torch.Tensor | None = None, seq_counts=None, fused: bool | None = None):
        if method not in LOSSES:
            raise ValueError(f"method: expected one of {', '.join(map(repr, LOSSES))}, got {method!r}")
        if method == "spin" and not isinstance(ref_logps, torch.Tensor):
            raise TypeError(f"ref_logps: method='spin' needs the reference log-probs as a tensor (2B,), got "
                            f"{type(ref_logps).__name__}")
        if method != "spin" and ref_logps is not None:
            raise ValueError("ref_logps: T-SPIN is reference-free; pass ref_logps=None")
        if method == "tspin_no_history" and beta is not None:
            raise ValueError(f"beta: method='tspin_no_history' has no history term to weight, got beta={beta!r}")
        self.method, self.ref_logps, self.seq_counts = method, ref_logps, seq_counts
        self.alpha = check_real("alpha", alpha)
        self.beta = None if method == "tspin_no_history" else check_real("beta", 0.1 if beta is None else beta)
        self.fused = check_fused(fused)

    def __call__(self, hidden, weight, labels, **options):
        """The loss on the head's inputs; ``options``: those of :func:`tspin_kernels.sequence_logps`."""
        common = dict(fused=self.fused, seq_counts=self.seq_counts, **options)
        if self.method == "tspin":
            return tspin_loss(hidden, weight, labels, alpha=self.alpha, beta=self.beta, **common)
        if self.method == "tspin_no_history":
            return tspin_no_history_loss(hidden, weight, labels, alpha=self.alpha, **common)
        return spin_loss(hidden, weight, labels, self.ref_logps.to(hidden.device), beta=self.beta, **common)

    def __repr__(self) -> str:
        return (f"LossSpec({self.method!r}, alpha={self.alpha}, beta={self.beta}, fused={self.fused}, "
                f"ref_logps={'given' if self.ref_logps is not None else None}, "
                f"seq_counts={'given' if self.seq_counts is not None else None})")
