"""nn.Module wrappers: options in the constructor, tensors in forward (input, weight, target order)."""

from __future__ import annotations

from torch import nn

from .functional import sequence_logps, spin_loss, tspin_loss


class SequenceLogps(nn.Module):
    def __init__(self, *, ignore_index: int = -100, shift: bool = False, average: bool = False, impl: str = "auto"):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, shift=shift, average=average, impl=impl)

    def forward(self, hidden, weight, labels, bias=None, cu_seqlens=None):
        return sequence_logps(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class TSPINLoss(SequenceLogps):
    def __init__(self, *, alpha: float = 1.0, beta: float = 0.1, **options):
        super().__init__(**options)
        self.alpha, self.beta = alpha, beta

    def forward(self, hidden, weight, labels, bias=None, cu_seqlens=None):
        return tspin_loss(hidden, weight, labels, alpha=self.alpha, beta=self.beta, bias=bias,
                          cu_seqlens=cu_seqlens, **self.options)


class SPINLoss(SequenceLogps):
    def __init__(self, *, beta: float = 0.1, **options):
        super().__init__(**options)
        self.beta = beta

    def forward(self, hidden, weight, labels, ref_logps, bias=None, cu_seqlens=None):
        return spin_loss(hidden, weight, labels, ref_logps, beta=self.beta, bias=bias, cu_seqlens=cu_seqlens,
                         **self.options)
