"""nn.Module wrappers: options in the constructor, tensors in forward (input, weight, target order)."""

from __future__ import annotations

from torch import nn

from ._options import check_flag, check_fused, check_impl, check_options, check_real
from .functional import sequence_logps, spin_loss, tspin_loss, tspin_no_history_loss


class SequenceLogps(nn.Module):
    """:func:`tspin_kernels.sequence_logps` as a module. The options are checked here, at construction;
    ``None`` ones take their environment defaults when each forward runs."""

    def __init__(self, *, ignore_index: int = -100, shift: bool = False, average: bool = False, impl: str = "auto",
                 backward: str | None = None, grad_filter_eps: float | None = None, tiles: dict | None = None,
                 chunk_elements: int | None = None, validate: bool = True):
        super().__init__()
        check_impl(impl)
        check_options(backward, grad_filter_eps, tiles, chunk_elements)
        for name, flag in (("shift", shift), ("average", average), ("validate", validate)):
            check_flag(name, flag)
        self.options = dict(ignore_index=ignore_index, shift=shift, average=average, impl=impl, backward=backward,
                            grad_filter_eps=grad_filter_eps, tiles=tiles, chunk_elements=chunk_elements,
                            validate=validate)

    def forward(self, hidden, weight, labels, bias=None, cu_seqlens=None):
        return sequence_logps(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)


class _LossModule(SequenceLogps):
    """A loss as a module: the options of :class:`SequenceLogps` plus ``fused`` (see :func:`tspin_loss`)."""

    def __init__(self, *, fused: bool | None = None, **options):
        super().__init__(**options)
        self.fused = check_fused(fused)

    def _options(self) -> dict:
        return dict(self.options, fused=self.fused)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items() if v is not None)


class TSPINLoss(_LossModule):
    def __init__(self, *, alpha: float = 1.0, beta: float = 0.1, **options):
        super().__init__(**options)
        self.alpha, self.beta = check_real("alpha", alpha), check_real("beta", beta)

    def forward(self, hidden, weight, labels, bias=None, cu_seqlens=None):
        return tspin_loss(hidden, weight, labels, alpha=self.alpha, beta=self.beta, bias=bias,
                          cu_seqlens=cu_seqlens, **self._options())


class SPINLoss(_LossModule):
    def __init__(self, *, beta: float = 0.1, **options):
        super().__init__(**options)
        self.beta = check_real("beta", beta)

    def forward(self, hidden, weight, labels, ref_logps, bias=None, cu_seqlens=None):
        return spin_loss(hidden, weight, labels, ref_logps, beta=self.beta, bias=bias, cu_seqlens=cu_seqlens,
                         **self._options())


class TSPINNoHistoryLoss(_LossModule):
    def __init__(self, *, alpha: float = 1.0, **options):
        super().__init__(**options)
        self.alpha = check_real("alpha", alpha)

    def forward(self, hidden, weight, labels, bias=None, cu_seqlens=None):
        return tspin_no_history_loss(hidden, weight, labels, alpha=self.alpha, bias=bias, cu_seqlens=cu_seqlens,
                                     **self._options())
