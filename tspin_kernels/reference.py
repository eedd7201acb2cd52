"""Pure-torch implementations: the naive oracle and the chunked, bounded-memory fallback.

``naive_sequence_logps`` materialises the full [tokens x vocab] logits exactly as a Hugging Face training loop
would (logits in the input dtype, log-softmax in float32). It is written independently of the compaction
step so tests check the fast paths against something that does not share their index logic.

``ChunkedSequenceLogps`` walks counted rows in chunks, keeps only the per-row log-sum-exp, and recomputes the
chunk's logits in backward, so peak memory is O(chunk x V) instead of O(tokens x V). Its logits are float32 for
every input dtype (as the Triton kernels' are), so large 16-bit logits do not overflow. It is the CPU path and the
fallback wherever Triton cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _device
from ._defaults import CHUNK_ELEMENTS


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
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    # ignored positions may hold anything (NaN in padding): zeroed before the matmul, so that neither the sums nor
    # any gradient (torch.where passes none to the branch it drops) sees them; counted logits are untouched
    hidden = torch.where(mask.unsqueeze(-1), hidden, hidden.new_zeros(()))
    logits = F.linear(hidden, weight, bias).to(acc)  # (R, T, V), as HF computes them
    logp = torch.log_softmax(logits, dim=-1)
    tok = logp.gather(-1, labels.masked_fill(~mask, 0).long().unsqueeze(-1)).squeeze(-1)
    tok = torch.where(mask, tok, tok.new_zeros(()))
    out = tok.sum(-1)
    if average:
        out = out / mask.sum(-1).clamp_min(1)
    return out


def naive_positions_logps(hidden, weight, positions, *, bias=None, average=False) -> torch.Tensor:
    """Full-logits oracle for explicit (row, target, sequence) triples: the logits of every triple's row (a
    repeated row is gathered once per triple, so autograd sums its gradient), log-softmax, gather, per-sequence
    sum (float32; float64 for float64 inputs)."""
    acc = acc_dtype(hidden.dtype)
    h = hidden.reshape(-1, hidden.shape[-1])[positions.rows.long()]
    logp = torch.log_softmax(F.linear(h, weight, bias).to(acc), dim=-1)
    tok = logp.gather(-1, positions.targets.long()[:, None]).squeeze(-1)
    seq = positions.seq_ids.long()
    out = torch.zeros(positions.num_seqs, dtype=acc, device=hidden.device).index_add(0, seq, tok)
    if average:
        counts = torch.zeros_like(out).index_add_(0, seq, torch.ones_like(tok))
        out = out / counts.clamp_min(1)
    return out


def refuse_double_backward() -> None:
    """Both Functions compute first derivatives only. Autograd runs a backward with grad mode on exactly when the
    caller asked for ``create_graph=True``; refuse it here rather than return a gradient without a graph."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "tspin_kernels: double backward is not supported (backward ran with create_graph=True): the fused "
            "log-prob paths compute first derivatives only. Use impl='reference' (full logits) for higher-order "
            "gradients, or call backward without create_graph."
        )


def _chunk_logits(h, weight, bias, chunk_elements: int):
    """float32 logits (float64 for float64 inputs) of the rows ``h``: 16-bit inputs are multiplied with a float32
    result, so a logit beyond the 16-bit range stays finite. On CUDA that is one product with a float32 output
    (tensor-core speed); elsewhere the weight is upcast one vocabulary slice of ``chunk_elements`` at a time,
    never as a float32 copy of the whole head."""
    if weight.dtype in (torch.float32, torch.float64):
        logits = h @ weight.T
    elif h.is_cuda and _device.mm_out_dtype_works():
        logits = torch.mm(h, weight.T, out_dtype=torch.float32)
    else:
        h32, V, D = h.float(), weight.shape[0], weight.shape[1]
        cols = max(1, chunk_elements // max(D, 1))
        logits = torch.empty(h.shape[0], V, dtype=torch.float32, device=h.device)
        for lo in range(0, V, cols):
            logits[:, lo:lo + cols] = h32 @ weight[lo:lo + cols].float().T
    if bias is not None:
        logits += bias.to(logits.dtype)
    return logits


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result. 16-bit CUDA inputs keep tensor-core speed and skip the rounding of the product
    to 16 bits (``out_dtype``, newer torch's cuBLAS path); CPU inputs are upcast (the tests' exact products)."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if not a.is_cuda:
        return a.float() @ b.float()
    if _device.mm_out_dtype_works():
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a layout this torch's out_dtype path lacks
            pass
    return (a @ b).float()  # the product rounded to 16 bits, as naive torch's own backward rounds it


def finish_forward(ctx, tok, lse, hidden2d, weight, bias, row_idx, target, seq_id, token_scale, num_seqs):
    """Shared tail of both Functions' forward: token log-probs -> per-sequence sums; keep only the LSE for backward."""
    out = torch.zeros(num_seqs, dtype=tok.dtype, device=tok.device)
    out.index_add_(0, seq_id, tok * token_scale.to(tok.dtype))
    ctx.save_for_backward(hidden2d, weight, bias, row_idx, target, seq_id, token_scale, lse)
    ctx.has_bias = bias is not None
    return out


def _upcast_slice(chunk_elements: int, weight: torch.Tensor) -> int:
    """Elements of a 16-bit weight upcast at once where no float32-output product exists: the chunk on the CPU
    (its default is 32 MiB), at most 32 MiB on CUDA (whose default chunk is 1 GiB)."""
    return min(chunk_elements, CHUNK_ELEMENTS) if weight.is_cuda else chunk_elements


class ChunkedSequenceLogps(torch.autograd.Function):
    """Per-sequence log-prob sums over compacted rows, chunked over rows, recomputing logits in backward."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, row_idx, target, seq_id, token_scale, num_seqs: int,
                unique_rows: bool, options):
        V = weight.shape[0]
        ctx.unique_rows = unique_rows
        n = row_idx.numel()
        ctx.chunk_elements = options.chunk_elements
        step = max(1, options.chunk_elements // V)
        slices = _upcast_slice(options.chunk_elements, weight)
        acc = acc_dtype(hidden2d.dtype)
        lse = torch.empty(n, dtype=acc, device=hidden2d.device)
        tok = torch.empty(n, dtype=acc, device=hidden2d.device)
        with torch.no_grad():
            for s in range(0, n, step):
                e = min(s + step, n)
                logits = _chunk_logits(hidden2d.index_select(0, row_idx[s:e]), weight, bias, slices)
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                tok[s:e] = logits.gather(1, target[s:e, None]).squeeze(1) - lse[s:e]
                del logits
        return finish_forward(ctx, tok, lse, hidden2d, weight, bias, row_idx, target, seq_id, token_scale, num_seqs)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward()
        hidden2d, weight, bias, row_idx, target, seq_id, token_scale, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        V = weight.shape[0]
        n = row_idx.numel()
        step = max(1, ctx.chunk_elements // V)
        slices = _upcast_slice(ctx.chunk_elements, weight)
        acc = lse.dtype
        g_tok = grad_out.to(acc)[seq_id] * token_scale.to(acc)  # d out / d token logp
        low_precision = weight.dtype not in (torch.float32, torch.float64)
        # a row repeated across chunks (CountedPositions) sums its contributions in float32, rounded once
        gh_dtype = acc if low_precision and not ctx.unique_rows else hidden2d.dtype
        grad_h = torch.zeros(hidden2d.shape, dtype=gh_dtype, device=hidden2d.device) if need_h else None
        # fp32 accumulators: many chunks add into the same weight rows
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
        # A 16-bit head on CUDA: both products in the weight's dtype with float32 results (tensor cores), as the
        # fused path does. A float32 d^T @ h there was a float32 GEMM, one reason this path ran 7x the fused one at
        # llama3-8b on an H200 (the other: 65-row chunks, see _defaults.CUDA_CHUNK_ELEMENTS). The CPU keeps its
        # float32 weight-gradient product.
        tensor_cores = low_precision and weight.is_cuda
        for s in range(0, n, step):
            e = min(s + step, n)
            idx = row_idx[s:e]
            h = hidden2d.index_select(0, idx)
            d = torch.exp(_chunk_logits(h, weight, bias, slices) - lse[s:e, None]).neg_()  # -softmax
            d.scatter_add_(1, target[s:e, None], torch.ones_like(lse[s:e, None]))  # + onehot
            d.mul_(g_tok[s:e, None])
            d_low = d.to(weight.dtype) if need_h or tensor_cores else None
            if need_h:
                grad_h.index_add_(0, idx, (d_low @ weight).to(grad_h.dtype))
            if need_w and tensor_cores:
                grad_w += mm_f32(d_low.T, h)
            elif need_w:
                grad_w.addmm_(d.T, h.float() if low_precision else h)
            if need_b:
                grad_b += d.sum(0)
            del d, d_low
        return (
            grad_h.to(hidden2d.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None, None, None, None, None, None, None,
        )
