"""tspin_kernels: fused hidden-states -> per-sequence log-probs for T-SPIN triplets, without materialising logits."""

from ._defaults import LossPath
from .functional import (
    SPINOutput,
    TSPINNoHistoryOutput,
    TSPINOutput,
    loss_path,
    sequence_logps,
    spin_loss,
    spin_loss_from_logps,
    tspin_loss,
    tspin_loss_from_logps,
    tspin_no_history_loss,
    tspin_no_history_loss_from_logps,
)
from .modules import SequenceLogps, SPINLoss, TSPINLoss, TSPINNoHistoryLoss
from .positions import CountedPositions

__all__ = [
    "sequence_logps", "tspin_loss", "spin_loss", "tspin_no_history_loss", "tspin_loss_from_logps",
    "spin_loss_from_logps", "tspin_no_history_loss_from_logps", "TSPINOutput", "SPINOutput", "TSPINNoHistoryOutput",
    "SequenceLogps", "TSPINLoss", "SPINLoss", "TSPINNoHistoryLoss", "CountedPositions", "loss_path", "LossPath",
]
__version__ = "0.1.0"
