"""Pure-torch implementations: the naive oracle and the chunked, bounded-memory fallback.

``naive_sequence_logps`` materialises the full [tokens x vocab] logits exactly as a Hugging Face training loop
would (logits in the input dtype, log-softmax in float32). It is written independently of the compaction
step so tests check the fast paths against something that does not share their index logic.

``ChunkedSequenceLogps`` walks counted rows in chunks, keeps only the per-row log-sum-exp, and recomputes the
chunk's logits in backward, so peak memory is O(chunk x V) instead of O(tokens x V). It is the CPU path and
the fallback wherever Triton cannot run.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# Logit elements per chunk (float32): 2**23 elements = 32 MiB. Large enough for good matmuls, small enough
# that the chunk never dominates memory. Override with TSPIN_CHUNK_ELEMENTS.
DEFAULT_CHUNK_ELEMENTS = 1 << 23


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and results are float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_sequence_logps(hidden, weight, labels, *, bias=None, cu_seqlens=None, ignore_index=-100,
                         shift=False, average=False) -> torch.Tensor:
    """Full-logits oracle: logits -> log_softmax -> gather -> masked per-sequence sum (float32)."""
    acc = acc_dtype(hidden.dtype)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        parts = [
            naive_sequence_logps(hidden[None, a:b], weight, labels[None, a:b], bias=bias, ignore_index=ignore_index,
                                 shift=shift, average=average)
            if b > a else hidden.new_zeros(1, dtype=acc) + 0 * hidden.sum(dtype=acc)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(parts)
    logits = F.linear(hidden, weight, bias).to(acc)  # (R, T, V), as HF computes them
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    logp = torch.log_softmax(logits, dim=-1)
    tok = logp.gather(-1, labels.masked_fill(~mask, 0).long().unsqueeze(-1)).squeeze(-1)
    tok = tok * mask
    out = tok.sum(-1)
    if average:
        out = out / mask.sum(-1).clamp_min(1)
    return out


def _chunk_rows(V: int) -> int:
    budget = int(os.environ.get("TSPIN_CHUNK_ELEMENTS", DEFAULT_CHUNK_ELEMENTS))
    return max(1, budget // V)


def _chunk_logits(h, weight, bias):
    # matmul in the input dtype (what torch users get), softmax statistics in float32
    logits = h @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.to(acc_dtype(logits.dtype))


def finish_forward(ctx, tok, lse, hidden2d, weight, bias, row_idx, target, seq_id, token_scale, num_seqs):
    """Shared tail of both Functions' forward: token log-probs -> per-sequence sums; keep only the LSE for backward."""
    out = torch.zeros(num_seqs, dtype=tok.dtype, device=tok.device)
    out.index_add_(0, seq_id, tok * token_scale.to(tok.dtype))
    ctx.save_for_backward(hidden2d, weight, bias, row_idx, target, seq_id, token_scale, lse)
    ctx.has_bias = bias is not None
    return out


class ChunkedSequenceLogps(torch.autograd.Function):
    """Per-sequence log-prob sums over compacted rows, chunked over rows, recomputing logits in backward."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, row_idx, target, seq_id, token_scale, num_seqs: int):
        V = weight.shape[0]
        n = row_idx.numel()
        step = _chunk_rows(V)
        acc = acc_dtype(hidden2d.dtype)
        lse = torch.empty(n, dtype=acc, device=hidden2d.device)
        tok = torch.empty(n, dtype=acc, device=hidden2d.device)
        with torch.no_grad():
            for s in range(0, n, step):
                e = min(s + step, n)
                logits = _chunk_logits(hidden2d.index_select(0, row_idx[s:e]), weight, bias)
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                tok[s:e] = logits.gather(1, target[s:e, None]).squeeze(1) - lse[s:e]
                del logits
        return finish_forward(ctx, tok, lse, hidden2d, weight, bias, row_idx, target, seq_id, token_scale, num_seqs)

    @staticmethod
    def backward(ctx, grad_out):
        hidden2d, weight, bias, row_idx, target, seq_id, token_scale, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        V = weight.shape[0]
        n = row_idx.numel()
        step = _chunk_rows(V)
        acc = lse.dtype
        g_tok = grad_out.to(acc)[seq_id] * token_scale.to(acc)  # d out / d token logp
        low_precision = weight.dtype not in (torch.float32, torch.float64)
        grad_h = torch.zeros_like(hidden2d) if need_h else None
        # fp32 accumulators: many chunks add into the same weight rows
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
        for s in range(0, n, step):
            e = min(s + step, n)
            idx = row_idx[s:e]
            h = hidden2d.index_select(0, idx)
            d = torch.exp(_chunk_logits(h, weight, bias) - lse[s:e, None]).neg_()  # -softmax
            d.scatter_add_(1, target[s:e, None], torch.ones_like(lse[s:e, None]))  # + onehot
            d.mul_(g_tok[s:e, None])
            if need_h:
                grad_h.index_add_(0, idx, (d.to(weight.dtype) @ weight).to(grad_h.dtype))
            if need_w:
                grad_w.addmm_(d.T, h.float() if low_precision else h)
            if need_b:
                grad_b += d.sum(0)
            del d
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None, None, None, None, None,
        )
