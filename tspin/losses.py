"""The loss path, shared by every command: the policy's fused log-probs -> T-SPIN / SPIN / SFT loss and metrics.

The policy (:func:`tspin.wrapping.wrap_model`) runs the backbone for the last hidden states and sends them with the
LM-head weight to tspin_kernels: the LM head is never applied to the full sequence, so no [tokens x vocab] logits
exist, forward or backward. For T-SPIN (with or without its history term) and SPIN the loss itself runs inside the
head's forward (a :class:`tspin_kernels.integrations.LossSpec`); tspin_kernels decides there, once, whether it
takes the fused path, which forms the head's gradients while the logits are at hand (3 passes over the head
instead of 4; its log-probs are then detached diagnostics, which is all the metrics need), or log-probs with their
own backward (``fused_loss: false``). Metrics stay tensors on the device; the training loop reads them once per
logged step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from tspin_kernels.integrations import VARLEN_SDPA, LossSpec, attention_implementation, shared_prefix_attention_mask
from tspin_kernels.integrations.triplets import spin_metrics, tspin_metrics

from .batch import Batch, collate
from .methods import LOSS_FIELDS, check_loss
from .wrapping import policy_of


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when the config asks for it; nothing on CPU."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def policy_logps(model, batch: Batch, *, impl: str = "auto", average: bool = False, loss: LossSpec | None = None):
    """Per-row sum (or mean) of response-token log-probs, float32 (R,), differentiable w.r.t. the model; with
    ``loss`` the loss's output computed from them inside the head's forward (``TSPINOutput`` / ``SPINOutput``).

    `model` is the training policy (one process, DDP or FSDP2). It is *called*, so DDP's gradient all-reduce and
    FSDP2's unshard hooks run. Padded rows use the attention mask; a packed row (1, N) uses position_ids restarting
    at 0 per sequence and cu_seqlens (and, under varlen_sdpa, its host-side segments); shared-prefix rows their own
    mask, positions and counted triples.
    """
    policy = policy_of(model)  # a clear error for anything but the policy
    # validate=False: collate already checked token ids, labels and offsets on the CPU, where it is free; the
    # kernels' value checks would read the device back (a stream sync per micro-batch on a GPU)
    if batch.shared is not None:  # the counted triples and the layout's mask, in the form the attention takes
        sp = batch.shared
        mask = shared_prefix_attention_mask(sp, policy.model)
        return model(sp.input_ids, sp.positions, mask, sp.position_ids, average=average, impl=impl, validate=False,
                     loss=loss)
    mask = batch.attention_mask
    if batch.segments is not None and attention_implementation(policy.model) == VARLEN_SDPA:
        mask = batch.segments  # the packed row's sequences, known on the host: the attention reads nothing back
    return model(batch.input_ids, batch.labels, mask, batch.position_ids, batch.cu_seqlens,
                 average=average, impl=impl, validate=False, loss=loss)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().mean()


def _loss_spec(loss: str, batch: Batch, *, alpha: float, beta: float, spin_lambda: float,
               fused: bool | None) -> LossSpec:
    """The loss the head computes in its forward; ``fused`` (None, True, False) is handed to tspin_kernels, which
    decides the path (the fused one, or log-probs with their own backward and the loss on them)."""
    counts = batch.seq_counts or None
    if loss == "tspin":
        return LossSpec("tspin", alpha=alpha, beta=beta, fused=fused, seq_counts=counts)
    if loss == "tspin_no_history":
        return LossSpec("tspin_no_history", alpha=alpha, fused=fused, seq_counts=counts)
    return LossSpec("spin", beta=spin_lambda, ref_logps=batch.ref_logps, fused=fused, seq_counts=counts)


def compute_loss(model, batch: Batch, *, method: str, alpha: float = 1.0, beta: float = 0.1,
                 spin_lambda: float = 0.1, impl: str = "auto", average: bool = False, fused: bool | None = None):
    """(loss summed over the batch's examples, or tokens for SFT; metrics as 0-d tensors). Dividing by the
    example/token count of the whole accumulation window is the caller's job: that keeps gradient accumulation
    exact (the losses are means over the micro-batch's examples: times their number, a sum again).

    ``method``: the loss (``tspin.methods.LOSS_FIELDS``: tspin, tspin_no_history, spin or sft; see
    ``methods.loss_of`` for a config's). ``beta`` weights T-SPIN's history term; tspin_no_history has none.
    ``fused`` (the config's ``fused_loss``): None lets tspin_kernels decide, True / False ask for the fused path
    or for log-probs with their own backward."""
    rows = len(LOSS_FIELDS[check_loss(method)])
    n = batch.num_examples
    if batch.seq_counts and len(batch.seq_counts) != rows * n:
        raise ValueError(f"batch: method={method!r} needs {rows} rows per example {LOSS_FIELDS[method]}, the batch "
                         f"holds {len(batch.seq_counts)} rows for {n} examples"
                         + (" (T-SPIN without its history term is method='tspin_no_history')"
                            if method == "tspin" and len(batch.seq_counts) == 2 * n else ""))
    if method == "spin" and batch.ref_logps is None:
        raise ValueError("SPIN batch has no ref_logps: compute them with the start-of-iteration policy first")
    if method == "sft":
        logps = policy_logps(model, batch, impl=impl, average=average)
        loss = -logps.sum()  # summed token NLL; divided by the window's token count
        # float64 like the Python float it replaces: the logged numbers do not depend on where they are reduced
        nll = loss.detach().double() / max(batch.num_tokens, 1)
        return loss, {"logps/real": _mean(logps), "nll/token": nll}
    spec = _loss_spec(method, batch, alpha=alpha, beta=beta, spin_lambda=spin_lambda, fused=fused)
    out = policy_logps(model, batch, impl=impl, average=average, loss=spec)
    loss = out.loss * n
    if method in ("tspin", "tspin_no_history"):
        real, gen, *proto = out[1:]
        return loss, tspin_metrics(real, gen, *proto, alpha=alpha)
    real, gen = out[1:]
    ref_real, ref_gen = batch.ref_logps.to(real.device).chunk(2)
    return loss, spin_metrics(real, gen, ref_real, ref_gen, beta=spin_lambda)


@dataclass(frozen=True)
class LogpSettings:
    """How no-grad log-probs are computed (SPIN's reference values, evaluation's margins): examples per forward, the
    kernels' implementation, sums or length means, the batch layout, bf16 autocast (CUDA only), a progress bar."""

    batch_size: int
    impl: str = "auto"
    average: bool = False
    layout: str = "padded"
    bf16: bool = True
    progress: bool = False


def scored_logps(model, features: list[dict], fields: tuple[str, ...], pad_token_id: int, settings: LogpSettings,
                 desc: str = "log-probs") -> dict[str, list[float]]:
    """:func:`batched_logps` under the settings' autocast."""
    with autocast(next(model.parameters()).device, settings.bf16):
        return batched_logps(model, features, fields, pad_token_id, batch_size=settings.batch_size,
                             impl=settings.impl, average=settings.average, layout=settings.layout,
                             progress=settings.progress, desc=desc)


@torch.no_grad()
def batched_logps(model, features: list[dict], fields: tuple[str, ...], pad_token_id: int, *, batch_size: int,
                  impl: str = "auto", average: bool = False, layout: str = "padded", progress: bool = False,
                  desc: str = "log-probs") -> dict[str, list[float]]:
    """No-grad log-probs of every feature's `fields` (SPIN's reference values, evaluation margins)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    attn = attention_implementation(policy_of(model).model)
    was_training = model.training
    model.eval()
    out = {f: [] for f in fields}
    for i in tqdm(range(0, len(features), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = features[i: i + batch_size]
        batch = collate(chunk, fields, pad_token_id, layout, attn_implementation=attn).to(device)
        lp = policy_logps(model, batch, impl=impl, average=average)
        for f, part in zip(fields, lp.float().cpu().chunk(len(fields))):
            out[f].extend(part.tolist())
    model.train(was_training)
    return out
