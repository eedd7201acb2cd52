"""The training methods, and the loss each one runs: decided here, once, for the config, the batches and the loss.

``config.method`` is ``tspin``, ``spin`` or ``sft``; with ``no_history`` T-SPIN runs without its history term, which
is a loss of its own (``tspin_no_history``: pairs [real; generated], no proto rows, no ``beta``), not T-SPIN with
``beta = 0`` on triplets nor SPIN with zero references. Torch-free: the config imports it.
"""

from __future__ import annotations

METHODS = ("tspin", "spin", "sft")
# each loss and the rows of one example, in the order the batches hold them
LOSS_FIELDS = {
    "tspin": ("real", "generated", "proto"),
    "tspin_no_history": ("real", "generated"),
    "spin": ("real", "generated"),
    "sft": ("real",),
}


def check_loss(name: str, what: str = "method") -> str:
    """A loss name (one of ``LOSS_FIELDS``), or a ValueError naming ``what``."""
    if name not in LOSS_FIELDS:
        raise ValueError(f"{what}={name!r}: expected one of {', '.join(LOSS_FIELDS)}")
    return name


def loss_of(method: str, no_history: bool = False) -> str:
    """The loss ``method`` (a ``config.method``) runs; ``no_history`` makes T-SPIN's the one without history."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    return "tspin_no_history" if method == "tspin" and no_history else method
