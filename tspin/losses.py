"""The loss path, shared by every trainer: backbone -> last hidden states -> tspin_kernels with the LM-head weight.

The LM head is never applied to the full sequence: the kernels compute per-sequence log-probs from the hidden
states and the head weight without materialising [tokens x vocab] logits, forward and backward.
"""

from __future__ import annotations

import torch

from tspin_kernels import sequence_logps, spin_loss_from_logps, tspin_loss_from_logps

from .data import Batch


def _unwrap(model):
    """The underlying *ForCausalLM (through PEFT / DDP / torch.compile wrappers)."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def backbone_and_head(model):
    lm = _unwrap(model)
    cfg = getattr(lm, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if cfg is not None and getattr(cfg, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"{type(lm).__name__}: {attr}={getattr(cfg, attr)} transforms the logits; "
                                      "the fused log-prob path supports a plain linear LM head only")
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", None)
    head = lm.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(lm).__name__}: expected a causal LM with a decoder backbone and an output embedding")
    return decoder, head


def policy_logps(model, batch: Batch, *, impl: str = "auto", average: bool = False) -> torch.Tensor:
    """Per-row sum (or mean) of response-token log-probs, float32 (R,), differentiable w.r.t. the model.

    Padded rows use the attention mask; a packed row (1, N) uses position_ids restarting at 0 per sequence
    (transformers builds the block-diagonal mask from them) and cu_seqlens for the kernels.
    """
    decoder, head = backbone_and_head(model)
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    weight, bias = head.weight, getattr(head, "bias", None)
    if weight.dtype != hidden.dtype:  # autocast hands back bf16 hidden states; the kernels want one dtype
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    if batch.cu_seqlens is not None:
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), batch.labels.reshape(-1)
    else:
        labels = batch.labels
    return sequence_logps(hidden, weight, labels, bias=bias, cu_seqlens=batch.cu_seqlens, shift=True,
                          average=average, impl=impl)


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
