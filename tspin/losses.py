"""The loss path, shared by every trainer: backbone -> last hidden states -> tspin_kernels with the LM-head weight,
one implementation: tspin_kernels.integrations.hf (backbone_and_head is re-exported from there).

The LM head is never applied to the full sequence: the kernels compute per-sequence log-probs from the hidden
states and the head weight without materialising [tokens x vocab] logits, forward and backward.
"""

from __future__ import annotations

import torch

from tspin_kernels import spin_loss_from_logps, tspin_loss_from_logps
from tspin_kernels.integrations import CausalLMLogps, backbone_and_head, causal_lm_sequence_logps  # noqa: F401

from .data import Batch


def _is_policy(model) -> bool:
    """A CausalLMLogps, possibly inside DDP (FSDP2 shards it in place, so it stays one)."""
    return isinstance(getattr(model, "module", model), CausalLMLogps)


def policy_logps(model, batch: Batch, *, impl: str = "auto", average: bool = False) -> torch.Tensor:
    """Per-row sum (or mean) of response-token log-probs, float32 (R,), differentiable w.r.t. the model.

    `model` is the wrapped training policy (tspin.distributed.wrap_model: CausalLMLogps, DDP or FSDP2) or a plain
    HF causal LM. The policy is *called*, so DDP's gradient all-reduce and FSDP2's unshard hooks run; a plain
    model goes through the same function (tspin_kernels.integrations.causal_lm_sequence_logps). Padded rows use
    the attention mask; a packed row (1, N) uses position_ids restarting at 0 per sequence and cu_seqlens.
    """
    if _is_policy(model):
        return model(batch.input_ids, batch.labels, batch.attention_mask, batch.position_ids, batch.cu_seqlens,
                     average=average, impl=impl)
    return causal_lm_sequence_logps(model, batch.input_ids, batch.labels, attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens, average=average,
                                    impl=impl)


def _mean(x: torch.Tensor) -> float:
    return x.detach().float().mean().item()


def compute_loss(model, batch: Batch, *, method: str, alpha: float = 1.0, beta: float = 0.1,
                 spin_lambda: float = 0.1, impl: str = "auto", average: bool = False):
    """(loss summed over the batch's examples, or tokens for SFT; metrics). Dividing by the example/token count of
    the whole accumulation window is the caller's job: that keeps gradient accumulation exact."""
    logps = policy_logps(model, batch, impl=impl, average=average)
    n = batch.num_examples
    if method == "sft":
        loss = -logps.sum()  # summed token NLL; divided by the window's token count
        return loss, {"logps/real": _mean(logps), "nll/token": -logps.sum().item() / max(batch.num_tokens, 1)}
    if method == "tspin":
        real, gen, proto = logps.chunk(3)
        loss = tspin_loss_from_logps(real, gen, proto, alpha=alpha, beta=beta) * n
        current, history = real - gen, gen - proto
        return loss, {
            "logps/real": _mean(real), "logps/generated": _mean(gen), "logps/proto": _mean(proto),
            "rewards/real": _mean(alpha * real), "rewards/generated": _mean(alpha * gen),
            "rewards/proto": _mean(alpha * proto),
            "rewards/margins": _mean(alpha * current), "rewards/accuracies": _mean((current > 0).float()),
            "margins/current": _mean(current), "margins/history": _mean(history),
            "rewards/history_accuracies": _mean((history > 0).float()),
        }
    if method == "spin":
        if batch.ref_logps is None:
            raise ValueError("SPIN batch has no ref_logps: compute them with the start-of-iteration policy first")
        real, gen = logps.chunk(2)
        ref_real, ref_gen = batch.ref_logps.to(logps.device).chunk(2)
        loss = spin_loss_from_logps(real, gen, ref_real, ref_gen, beta=spin_lambda) * n
        r_real, r_gen = spin_lambda * (real - ref_real), spin_lambda * (gen - ref_gen)
        return loss, {
            "logps/real": _mean(real), "logps/generated": _mean(gen),
            "rewards/real": _mean(r_real), "rewards/generated": _mean(r_gen),
            "rewards/margins": _mean(r_real - r_gen), "rewards/accuracies": _mean((r_real > r_gen).float()),
            "margins/current": _mean(real - gen),
        }
    raise ValueError(f"method={method!r}: expected tspin, spin or sft")


@torch.no_grad()
def batched_logps(model, features: list[dict], fields: tuple[str, ...], pad_token_id: int, *, batch_size: int,
                  impl: str = "auto", average: bool = False, layout: str = "padded", progress: bool = False,
                  desc: str = "log-probs") -> dict[str, list[float]]:
    """No-grad log-probs of every feature's `fields` (SPIN's reference values, evaluation margins)."""
    from tqdm.auto import tqdm

    from .data import collate

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {f: [] for f in fields}
    for i in tqdm(range(0, len(features), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = features[i: i + batch_size]
        lp = policy_logps(model, collate(chunk, fields, pad_token_id, layout).to(device), impl=impl, average=average)
        for f, part in zip(fields, lp.float().cpu().chunk(len(fields))):
            out[f].extend(part.tolist())
    model.train(was_training)
    return out
