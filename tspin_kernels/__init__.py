"""tspin_kernels: fused hidden-states -> per-sequence log-probs for T-SPIN triplets, without materialising logits."""

from .functional import (
    SPINOutput,
    TSPINOutput,
    sequence_logps,
    spin_loss,
    spin_loss_from_logps,
    tspin_loss,
    tspin_loss_from_logps,
)
from .modules import SequenceLogps, SPINLoss, TSPINLoss
from .positions import CountedPositions

__all__ = [
    "sequence_logps", "tspin_loss", "spin_loss", "tspin_loss_from_logps", "spin_loss_from_logps",
    "TSPINOutput", "SPINOutput", "SequenceLogps", "TSPINLoss", "SPINLoss", "CountedPositions",
]
__version__ = "0.1.0"
