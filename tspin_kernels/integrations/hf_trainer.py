"""The plain ``transformers.Trainer`` (or any loop that calls ``model(..., labels=...)``) with the causal-LM loss
from the fused kernel, in one line:

    install_fused_loss(model)          # then Trainer(model=model, ...) as usual

After it, ``model(..., labels=labels)`` returns the same loss as Hugging Face's ``ForCausalLMLoss`` (token mean,
or sum / ``num_items_in_batch`` when the Trainer passes it, so gradient accumulation and
``average_tokens_across_devices`` stay exact) without building ``[tokens x vocab]`` logits; ``outputs.logits`` is
None then. Without labels the model is unchanged (generation, ``model(input_ids).logits``). The Trainer's own code
paths run untouched: it is the model that computes the loss, as it always does.

``model(..., labels=labels, return_sequence_logps=True)`` returns the per-row sums of label log-probs instead
(``outputs.sequence_logps``, float32 ``(R,)``), for preference losses computed in a custom ``compute_loss``.
``model(..., labels=labels, loss_spec=LossSpec(...))`` computes that loss (T-SPIN, T-SPIN without history, SPIN)
inside the LM head's forward, where tspin_kernels can take the fused path (``outputs.loss``, and the rows'
log-probs as ``outputs.sequence_logps``, detached on the fused path). All go through the model's ``forward``, so
DDP / FSDP / Accelerate wrappers see an ordinary call.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from .hf import backbone_and_head, install_fused_head, unwrap_causal_lm
from .loss_spec import LossSpec

__all__ = ["install_fused_loss", "SequenceLogpsOutput"]


@dataclass
class SequenceLogpsOutput(ModelOutput):
    """``model(..., labels=..., return_sequence_logps=True)``: per-row sums of the label tokens' log-probs; with
    ``loss_spec=`` also the loss (the log-probs then in row order, detached on the fused path)."""

    loss: torch.Tensor | None = None
    sequence_logps: torch.Tensor | None = None


def _fused_loss_output(model, args, kwargs, labels, shift_labels, num_items_in_batch, impl, ignore_index,
                       return_sequence_logps, loss_spec):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    decoder, head = backbone_and_head(model)
    kwargs.pop("logits_to_keep", None)  # a head option: no logits are built here
    kwargs.setdefault("use_cache", False)  # a loss needs no KV cache (pass use_cache=True to get one back)
    out = decoder(*args, **kwargs)
    hidden = out.last_hidden_state.to(head.weight.device)
    if shift_labels is not None:  # already aligned (context parallelism, padding-free collators)
        aligned, shift = shift_labels.to(hidden.device), False
    else:
        aligned, shift = labels.to(hidden.device), True
    if loss_spec is not None:
        out = head(hidden, aligned, shift=shift, ignore_index=ignore_index, impl=impl, loss=loss_spec)
        return SequenceLogpsOutput(loss=out.loss, sequence_logps=torch.cat(out[1:]))
    logps = head(hidden, aligned, shift=shift, ignore_index=ignore_index, impl=impl)
    if return_sequence_logps:
        return SequenceLogpsOutput(sequence_logps=logps)
    if num_items_in_batch is None:  # ForCausalLMLoss' reduction="mean" over the predicted tokens
        counted = aligned[..., 1:] if shift else aligned
        denominator = (counted != ignore_index).sum().clamp(min=1)
    else:
        denominator = num_items_in_batch.to(hidden.device) if hasattr(num_items_in_batch, "to") else num_items_in_batch
    return CausalLMOutputWithPast(loss=-logps.sum() / denominator,
                                  past_key_values=getattr(out, "past_key_values", None))


def install_fused_loss(model: nn.Module, *, impl: str = "auto", ignore_index: int = -100) -> nn.Module:
    """Make ``model(..., labels=...)`` compute the causal-LM loss through the fused kernel; returns ``model``.

    Works on a ``*ForCausalLM`` or a PEFT model of one (install before or after ``get_peft_model``); idempotent.
    Refuses what the fused path cannot reproduce: logits transformed after the head (soft-capping,
    ``logit_scale``), an adapter on the LM head, and MoE models that add a router auxiliary loss.
    """
    lm = unwrap_causal_lm(model)
    backbone_and_head(lm)
    config = getattr(lm, "config", None)
    if getattr(config, "output_router_logits", False) and getattr(config, "router_aux_loss_coef", 0.0):
        raise NotImplementedError(
            f"model: {type(lm).__name__} adds a router auxiliary loss (output_router_logits=True, "
            f"router_aux_loss_coef={config.router_aux_loss_coef}) that the fused loss does not compute; set "
            "config.output_router_logits=False to train without it"
        )
    install_fused_head(lm)
    if getattr(lm.__dict__.get("forward"), "_tspin_fused_loss", False):
        return model
    original = lm.forward

    @functools.wraps(type(lm).forward)  # keeps the signature that Trainer and generate inspect
    def forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, return_sequence_logps=False,
                loss_spec: LossSpec | None = None, **kwargs):
        if loss_spec is not None and not isinstance(loss_spec, LossSpec):
            raise TypeError(f"loss_spec: expected a tspin_kernels.integrations.LossSpec, got "
                            f"{type(loss_spec).__name__}")
        if labels is None:  # like Hugging Face's models: no labels, no loss (shift_labels only refine labels)
            if return_sequence_logps or loss_spec is not None:
                raise ValueError("labels: return_sequence_logps / loss_spec need the labels whose log-probs to sum")
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            return original(*args, **kwargs)
        return _fused_loss_output(self, args, kwargs, labels, shift_labels, num_items_in_batch, impl, ignore_index,
                                  return_sequence_logps, loss_spec)

    forward._tspin_fused_loss = True
    lm.forward = types.MethodType(forward, lm)
    return model
