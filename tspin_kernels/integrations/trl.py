"""TRL's ``DPOTrainer`` with the policy's and the reference's log-probs from the fused kernels, in one line:

    from tspin_kernels.integrations.trl import FusedDPOTrainer as DPOTrainer

Everything else stays TRL's: ``DPOConfig``, datasets, collator, every ``loss_type`` (and ``loss_weights``,
``ld_alpha``, ``use_weighting``, ``f_divergence_type``), the reference model / PEFT adapter handling,
``precompute_ref_log_probs``, metrics and their gathering across ranks.

The seam. TRL >= 1.15 gives the model a second forward (``trl.trainer.utils.add_fused_lm_head``): called with
``fused_lm_head=True`` it runs the backbone and returns a ``FusedCausalLMOutput`` of per-token label log-probs
(plus per-token logit statistics for metrics) instead of logits; ``DPOTrainer`` reads nothing else from the model.
:class:`FusedLogpsMixin` replaces that forward, on the policy and on the reference model, by one whose label
log-probs come from :func:`tspin_kernels.sequence_logps`, with every position its own one-token row: the values
are the exact per-token log-probs (so TRL's per-token logic, e.g. ``ld_alpha`` or the ``sft`` loss, is unchanged)
and their gradient reaches the backbone and the head. The no-grad statistics TRL logs (entropy, mean logit,
top-1 accuracy) and WPO's ``log(sum p^2)`` are computed by TRL's own chunked kernel, without gradient, over the
completion tokens of the policy's forwards only; ``logit_metrics=False`` skips that pass (and those metrics).

Refused, with an error naming the option: vision-language models (the fused path runs the text decoder only),
MoE router auxiliary loss (``router_aux_loss_coef``), DeepSpeed ZeRO-3 (the kernels' backward reads the head
weight after ZeRO-3 has released it), models whose logits are transformed after the head (soft-capping,
``logit_scale``) and an adapter on the LM head. TRL versions outside the supported range are refused (older:
no seam) or warned about (newer: untested).
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hf import backbone_and_head, install_fused_head, unwrap_causal_lm
from .tspin_trainer import TSPINConfig, TSPINTrainer  # T-SPIN on the Trainer TRL builds on (no DPOTrainer parts)

try:
    import trl
    from packaging.version import Version
    from trl import DPOTrainer
except ImportError as e:  # pragma: no cover - exercised only where TRL is absent
    raise ImportError(
        "tspin_kernels.integrations.trl needs TRL: pip install 'tspin[trl]' (trl>=1.15,<1.17)"
    ) from e

__all__ = ["FusedDPOTrainer", "FusedLogpsMixin", "SUPPORTED_TRL", "check_trl_version", "TSPINConfig", "TSPINTrainer"]

# The versions whose DPOTrainer reads its log-probs through ``fused_lm_head=True`` and that the tests ran on.
SUPPORTED_TRL = (Version("1.15.0"), Version("1.17.0"))
# TRL's per-token statistics besides the log-probs (``FusedCausalLMOutput`` fields, in TRL's order).
_STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Metrics DPOTrainer derives from those statistics; dropped from the logs with ``logit_metrics=False``.
_LOGIT_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")
# Logit elements per tile of the statistics pass. On CUDA TRL folds a tile with a Triton kernel: 2**23 elements
# (16 MiB in bf16) as our chunked path uses. Elsewhere it folds in torch with about five tile-sized temporaries, so
# the tiles are 4x smaller there (8 MiB each in float32).
_STATS_TILE_ELEMENTS = {"cuda": 1 << 23, "other": 1 << 21}


def check_trl_version(version: str | None = None) -> None:
    """Raise below the supported range (no fused-head seam there); warn above it (not tested)."""
    v = Version(version or trl.__version__)
    lo, hi = SUPPORTED_TRL
    if v < lo:
        raise RuntimeError(
            f"trl {v}: the fused DPO path needs trl>={lo},<{hi} (pip install 'tspin[trl]'). Earlier DPOTrainers "
            "compute full logits inside their loss and have no fused-LM-head forward to replace."
        )
    if v >= hi:
        warnings.warn(
            f"trl {v} is newer than the versions tspin_kernels' DPO integration was tested with (>={lo},<{hi}); "
            "its tests (tests/test_trl_dpo.py) check the numbers against TRL's own path",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------------
# The forward that replaces TRL's fused LM head
# ---------------------------------------------------------------------------------------------------------------


def _token_logps(head: nn.Module, hidden: torch.Tensor, aligned: torch.Tensor, impl: str) -> torch.Tensor:
    """Per-position label log-probs ``(B, T)`` of aligned labels (-100 -> 0), each position a one-token row.

    The (B*T, 1, D) view costs no copy; ignored positions are dropped by the kernel before any matmul. The head is
    *called* (its forward was made fused by :func:`install_fused_head`), so FSDP's hooks gather its weight.
    """
    b, t, d = hidden.shape
    out = head(hidden.reshape(b * t, 1, d), aligned.reshape(b * t, 1), shift=False, impl=impl)
    return out.view(b, t)


def _logit_stats(head: nn.Module, hidden: torch.Tensor, aligned: torch.Tensor, wanted: tuple[str, ...]) -> dict:
    """TRL's per-token statistics (no gradient) at the counted positions, computed by TRL's own chunked kernel."""
    from trl.kernels import ChunkedLogProbFunction

    mask = aligned != -100
    rows = hidden[mask]
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # an FSDP2 / TP DTensor outside the head's forward
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    budget = _STATS_TILE_ELEMENTS["cuda" if rows.is_cuda else "other"]
    width = max(128, budget // max(1, min(rows.shape[0], 4096)))  # TRL tiles 4096 tokens at a time
    with torch.no_grad():
        per_token = ChunkedLogProbFunction.apply(rows, weight, bias, aligned[mask], 1.0, width, None, 1.0, wanted)
    stats = {}
    for name, value in zip(_STATS, per_token[1:]):
        if value is not None:
            stats[name] = value.new_zeros(mask.shape).masked_scatter(mask, value)
    return stats


def _placeholder_stats(mask: torch.Tensor, wanted: tuple[str, ...]) -> dict:
    """Zeros where TRL expects statistics that ``logit_metrics=False`` does not compute (their metrics are dropped)."""
    return {name: torch.zeros(mask.shape, dtype=torch.bool if name == "is_top1" else torch.float32,
                              device=mask.device) for name in wanted}


def _fused_output(model, args, kwargs, labels, shift_labels, num_items_in_batch, *, impl, stats, compute_stats):
    """TRL's ``fused_lm_head=True`` contract (``trl.trainer.utils.add_fused_lm_head``), log-probs from our kernel."""
    from trl.trainer.utils import FusedCausalLMOutput

    decoder, head = backbone_and_head(model)
    kwargs["use_cache"] = False
    hidden = decoder(*args, **kwargs).last_hidden_state
    hidden = hidden.to(head.weight.device)  # a model split over devices (device_map) may end elsewhere
    if shift_labels is None:
        aligned = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts input t+1
    else:
        aligned = shift_labels  # already aligned (context / sequence parallelism)
    aligned = aligned.to(head.weight.device)
    log_probs = _token_logps(head, hidden, aligned, impl)
    mask = aligned != -100
    # The reference's forward in training (model.training, no grad) never reads the statistics: skip their pass.
    wanted = stats if (torch.is_grad_enabled() or not model.training) else ()
    if compute_stats:
        extra = _logit_stats(head, hidden.detach(), aligned, wanted) if wanted else {}
    else:
        extra = _placeholder_stats(mask, wanted)
    if shift_labels is None:
        log_probs, mask = log_probs[:, :-1], mask[:, :-1]
        extra = {k: v[:, :-1] for k, v in extra.items()}
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / denominator, log_probs=log_probs, label_mask=mask, **extra)


def _install(model: nn.Module, *, impl: str, stats: tuple[str, ...], compute_stats: bool, accelerator) -> None:
    """Replace TRL's fused-head forward on ``model`` (the patched ``*ForCausalLM``, found through wrappers).

    The forward installed last is replaced as a whole, so what wrapped TRL's forward must be kept: the only such
    layer DPOTrainer adds before training is Accelerate's mixed-precision wrapper on the reference model (marked
    by ``_original_forward``), whose autocast the fused branch re-enters. The policy is wrapped at ``train()``,
    after this, around our forward.
    """
    lm = unwrap_causal_lm(model)
    trl_forward = lm.__dict__.get("forward")
    if trl_forward is None:
        raise RuntimeError(
            f"model: {type(lm).__name__} carries no TRL fused LM head; FusedDPOTrainer replaces the one "
            "DPOTrainer installs (trl>=1.15)"
        )
    if getattr(trl_forward, "_tspin_fused", False):
        return
    backbone_and_head(lm)  # refuses soft-capped / scaled logits
    install_fused_head(lm)  # refuses an LM head wrapped by an adapter
    options = dict(impl=impl, stats=stats, compute_stats=compute_stats)
    autocast = accelerator.autocast if "_original_forward" in lm.__dict__ else contextlib.nullcontext

    @functools.wraps(type(lm).forward)  # keeps the signature `generate` validates its model kwargs against
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:  # generation, logits: TRL's wrapper hands the call to the model's own forward
            return trl_forward(*args, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        with autocast():
            return _fused_output(self, args, kwargs, labels, shift_labels, num_items_in_batch, **options)

    forward._tspin_fused = True
    lm.forward = types.MethodType(forward, lm)


class FusedLogpsMixin:
    """Put before ``trl.DPOTrainer`` (or a subclass of it): its log-probs then come from the fused kernels.

    Keyword arguments on top of DPOTrainer's:
        impl: ``sequence_logps``' implementation (``"auto"``: Triton on CUDA, chunked torch elsewhere).
        logit_metrics: compute TRL's logit metrics (``entropy``, ``logits/chosen|rejected``,
            ``mean_token_accuracy``) with one extra no-grad head pass over the policy's completion tokens. With
            False they are not logged (and ``use_weighting``, which needs that pass, is refused).
    """

    def __init__(self, *args, impl: str = "auto", logit_metrics: bool = True, **kwargs):
        check_trl_version()
        if not isinstance(self, DPOTrainer):
            raise TypeError(f"{type(self).__name__}: FusedLogpsMixin must be combined with trl.DPOTrainer")
        if not isinstance(logit_metrics, bool):
            raise TypeError(f"logit_metrics: expected a bool, got {type(logit_metrics).__name__}")
        self._tspin_options = dict(impl=impl, logit_metrics=logit_metrics)
        super().__init__(*args, **kwargs)
        self._tspin_install()

    def _tspin_install(self) -> None:
        """Checks what the fused path cannot reproduce, then swaps the forwards (policy and reference)."""
        if getattr(self, "_is_vlm", False):
            raise NotImplementedError(
                "processing_class: vision-language models are not supported by the fused log-prob path (it runs "
                "the text decoder on token ids); use trl.DPOTrainer"
            )
        if getattr(self, "aux_loss_enabled", False):
            raise NotImplementedError(
                "router_aux_loss_coef: the MoE load-balancing loss needs router logits, which the fused path does "
                "not return; set router_aux_loss_coef=0.0 or use trl.DPOTrainer"
            )
        if self.is_deepspeed_enabled:
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                raise NotImplementedError(
                    "deepspeed: ZeRO-3 is not supported by the fused log-prob path (its backward reads the LM-head "
                    "weight after ZeRO-3 has released it); use ZeRO-1/2, FSDP2 or trl.DPOTrainer"
                )
        opts = self._tspin_options
        if self.use_weighting and not opts["logit_metrics"]:
            raise ValueError("use_weighting: WPO weights need the logit statistics; pass logit_metrics=True")
        stats = ("entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if self.use_weighting else ())
        _install(self.model, impl=opts["impl"], stats=stats, compute_stats=opts["logit_metrics"],
                 accelerator=self.accelerator)
        if self.ref_model is not None:
            _install(self.ref_model, impl=opts["impl"], stats=(), compute_stats=False, accelerator=self.accelerator)

    def _precompute_ref_logps(self, *args, **kwargs):
        # runs inside DPOTrainer.__init__, before __init__ returns: swap the forwards first
        self._tspin_install()
        return super()._precompute_ref_logps(*args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if not self._tspin_options["logit_metrics"]:
            for mode in self._metrics.values():
                for key in _LOGIT_METRICS:
                    mode.pop(key, None)
        super().log(logs, *args, **kwargs)


class FusedDPOTrainer(FusedLogpsMixin, DPOTrainer):
    """``trl.DPOTrainer`` whose policy and reference log-probs come from :func:`tspin_kernels.sequence_logps`."""

