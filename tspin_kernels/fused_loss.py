"""The T-SPIN and SPIN losses with their gradients formed inside the pass that computes the logits.

Work, in units of ``2 * N_counted * D * V`` (one product of the counted rows with the head): the recompute path
(``sequence_logps`` + the loss on its log-probs) does **4** with a trainable head: the forward computes the logits and
keeps only their log-sum-exp, the backward computes them again, then grad_hidden and grad_weight. This path does
**3** (2 with a frozen head): the logits once, then the two gradient products.

It can, because these losses are means over *tuples* of sequences (triplets ``[real, generated, proto]`` for
T-SPIN, pairs ``[real, generated]`` for SPIN; tuple ``t`` holds sequences ``t, B+t, 2B+t``) of a function of the
tuple's own log-probs. Once a tuple's rows are reduced, d loss / d logp of its sequences is known, so:

1. counted positions are ordered by tuple and walked in **chunks of whole tuples**;
2. per chunk: logits (float32 for every input dtype), reduced to log-sum-exp and target log-probs; the chunk's
   per-sequence log-probs give d loss / d logp for its tuples; the same logits buffer becomes dlogits in place;
   ``grad_hidden[rows] = dlogits @ W`` and ``grad_weight += dlogits^T @ H[rows]`` (float32 accumulators);
3. the backward only multiplies the stored gradients by the incoming (scalar) gradient of the loss.

Memory: a chunk closes once it holds ``TARGET_ELEMENTS`` logits (the recompute path's chunk, enough for efficient
products) and never takes a tuple that would put it above ``chunk_elements`` (the cap). A tuple whose rows alone
exceed the cap is processed in row sub-chunks of at most ``chunk_elements`` logits with **two passes** (pass 1:
log-sum-exp and log-probs; pass 2: logits again, dlogits, products): 4 units for that tuple only, the same memory
bound as the recompute path. Held from forward to backward: the counted rows' grad_hidden (``Nc x D``) and, for a
trainable head, its gradient (``V x D``), both float32 (these are the backward's outputs, computed early).

Differentiability: only the loss. The per-sequence log-probs returned with it are detached diagnostics
(``requires_grad=False``; their own gradient is never formed). Use ``fused=False`` (the recompute path) to
backpropagate through the log-probs themselves. First derivatives only, one backward per forward.

Two engines share the chunk walk: ``TorchEngine`` (in-place torch ops; the CPU path) and the Triton epilogues of
``kernels/fused_loss.py`` (CUDA; CPU under ``TRITON_INTERPRET=1``). The products are torch/cuBLAS matmuls in both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._defaults import CHUNK_ELEMENTS
from .reference import _chunk_logits, acc_dtype, mm_f32, refuse_double_backward

# A chunk closes once it holds this many float32 logits (32 MiB): products of that many rows run at full speed.
TARGET_ELEMENTS = CHUNK_ELEMENTS


@dataclass(frozen=True)
class TupleLoss:
    """A loss that is the mean over B tuples of K sequences of ``terms(x, t)``: ``x`` the (K, b) log-probs of the
    tuples ``t`` (b,), row k holding sequence ``k*B + t``; returns the (b,) per-tuple losses.

    ``seq_counts``: each sequence's number of counted positions, known on the host (the caller's plan), or None
    (then they are read back from the device: one host sync)."""

    K: int
    terms: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    seq_counts: tuple[int, ...] | None = None

    def loss(self, logps: torch.Tensor) -> torch.Tensor:
        B = logps.numel() // self.K
        return self.terms(logps.view(self.K, B), torch.arange(B, device=logps.device)).mean()

    def grad(self, logps: torch.Tensor, t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence ids (K*b,), d loss / d logp of those sequences) for the tuples [t0, t1)."""
        B = logps.numel() // self.K
        tuples = torch.arange(t0, t1, device=logps.device)
        seqs = (torch.arange(self.K, device=logps.device)[:, None] * B + tuples).reshape(-1)
        with torch.enable_grad():
            x = logps[seqs].view(self.K, t1 - t0).detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.terms(x, tuples).sum(), x)
        return seqs, g.reshape(-1) / B


def plan_chunks(counts: list[int], V: int, cap: int, target: int = TARGET_ELEMENTS) -> list[tuple[int, int, int, int]]:
    """Chunks ``(p0, p1, t0, t1)`` of consecutive whole tuples [t0, t1) over the tuple-ordered positions [p0, p1).

    A chunk closes once it holds ``target`` logits (``rows * V``) or before a tuple that would take it over
    ``cap``; a tuple over ``cap`` on its own is a chunk alone (processed in two passes)."""
    plan, p, t0, rows = [], 0, 0, 0
    for t, c in enumerate(counts):
        if rows and (rows + c) * V > cap:
            plan.append((p - rows, p, t0, t))
            t0, rows = t, 0
        rows, p = rows + c, p + c
        if rows * V >= target:
            plan.append((p - rows, p, t0, t + 1))
            t0, rows = t + 1, 0
    if t0 < len(counts):
        plan.append((p - rows, p, t0, len(counts)))
    return plan


class TorchEngine:
    """Row statistics and dlogits with in-place torch ops on the chunk's float32 logits."""

    @staticmethod
    def reduce(logits, tgt):
        """(log-sum-exp, target log-prob, state); ``logits`` is left holding ``exp(x - rowmax)``, state = row sums."""
        m = logits.amax(1)
        t = logits.gather(1, tgt[:, None]).squeeze(1)
        logits.sub_(m[:, None]).exp_()
        s = logits.sum(1)
        lse = m + s.log()
        return lse, t - lse, s

    @staticmethod
    def recomputed(logits, lse):
        """State for freshly recomputed logits (two-pass chunks): ``logits`` becomes the softmax."""
        logits.sub_(lse[:, None]).exp_()
        return None

    @staticmethod
    def dlogits(logits, state, lse, tgt, g_tok, weight, need_b):
        """dlogits = g * (onehot - softmax), in place; returns (dlogits, its column sums or None)."""
        scale = -g_tok if state is None else -g_tok / state
        logits.mul_(scale[:, None]).scatter_add_(1, tgt[:, None], g_tok[:, None])
        colsum = logits.sum(0) if need_b else None
        if logits.is_cuda and weight.dtype not in (torch.float32, torch.float64):
            logits = logits.to(weight.dtype)  # products at the weight's tensor-core speed, float32 results
        return logits, colsum


def _accumulate(d, h, weight, gh, gw, slice_elements: int) -> None:
    """gh (the chunk's rows, zeros) = d @ W and gw += d^T @ h, with float32 (float64) results.

    ``d`` in the weight's dtype (16-bit on CUDA): products with float32 output. ``d`` float32 with a 16-bit weight
    (CPU): the weight is upcast one vocabulary slice at a time, never as a whole float32 copy."""
    if d.dtype == weight.dtype:
        if gh is not None:
            if d.dtype in (torch.float32, torch.float64):
                torch.mm(d, weight, out=gh)
            else:
                gh.copy_(mm_f32(d, weight))
        if gw is not None:
            if d.dtype in (torch.float32, torch.float64):
                gw.addmm_(d.T, h)
            else:
                gw += mm_f32(d.T, h)
        return
    V, D = weight.shape
    cols = max(1, slice_elements // max(D, 1))
    h32 = h.float() if gw is not None else None
    for lo in range(0, V, cols):
        w32 = weight[lo:lo + cols].float()
        if gh is not None:
            gh.addmm_(d[:, lo:lo + cols], w32)
        if gw is not None:
            gw[lo:lo + cols].addmm_(d[:, lo:lo + cols].T, h32)


class FusedTupleLoss(torch.autograd.Function):
    """(loss, per-sequence log-probs) of a :class:`TupleLoss` over compacted rows; the gradients of ``hidden2d``,
    ``weight`` and ``bias`` are computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, row_idx, target, seq_id, token_scale, num_seqs: int, options,
                spec: TupleLoss, engine, track: bool, validate: bool):
        acc = acc_dtype(hidden2d.dtype)
        dev = hidden2d.device
        V, D = weight.shape
        need_h = track and ctx.needs_input_grad[0]
        need_w = track and ctx.needs_input_grad[1]  # False for a frozen head: no weight-gradient product
        need_b = track and bias is not None and ctx.needs_input_grad[2]
        cap = options.chunk_elements
        slice_elements = min(cap, CHUNK_ELEMENTS)  # a 16-bit weight's upcast slices on the CPU

        # order the counted positions by tuple (stable: each sequence keeps its own order)
        B = num_seqs // spec.K
        tup = seq_id.remainder(B)
        order = torch.argsort(tup, stable=True)
        rows, tgt, seq = row_idx[order], target[order], seq_id[order]
        scale = token_scale[order].to(acc)
        counts = _tuple_counts(spec, seq_id, num_seqs, validate)

        logps = torch.zeros(num_seqs, dtype=acc, device=dev)
        gh = torch.zeros((rows.numel(), D), dtype=acc, device=dev) if need_h else None
        gw = torch.zeros((V, D), dtype=acc, device=dev) if need_w else None
        gb = torch.zeros(V, dtype=acc, device=dev) if need_b else None
        g_seq = torch.zeros(num_seqs, dtype=acc, device=dev)

        def logits_of(s, e):
            h = hidden2d.index_select(0, rows[s:e])
            return h, _chunk_logits(h, weight, bias, slice_elements)

        for p0, p1, t0, t1 in plan_chunks(counts, V, cap):
            if p1 == p0:
                continue
            one_pass = (p1 - p0) * V <= cap
            step = p1 - p0 if one_pass else max(1, cap // V)
            subs = [(s, min(s + step, p1)) for s in range(p0, p1, step)]
            lse = torch.empty(p1 - p0, dtype=acc, device=dev)
            kept = None
            for s, e in subs:  # pass 1: statistics
                h, logits = logits_of(s, e)
                lse[s - p0:e - p0], tok, state = engine.reduce(logits, tgt[s:e])
                logps.index_add_(0, seq[s:e], tok * scale[s:e])
                kept = (h, logits, state) if one_pass else None
                del h, logits
            if not (need_h or need_w or need_b):
                continue
            seqs, g = spec.grad(logps, t0, t1)
            g_seq[seqs] = g
            for s, e in subs:  # pass 2 (the same logits when the chunk fits): dlogits and the two products
                if kept is not None:
                    h, logits, state = kept
                    kept = None
                else:
                    h, logits = logits_of(s, e)
                    state = engine.recomputed(logits, lse[s - p0:e - p0])
                g_tok = g_seq[seq[s:e]] * scale[s:e]
                d, colsum = engine.dlogits(logits, state, lse[s - p0:e - p0], tgt[s:e], g_tok, weight, need_b)
                del logits
                _accumulate(d, h, weight, gh[s:e] if need_h else None, gw, slice_elements)
                if need_b:
                    gb += colsum
                del d, h

        ctx.grads = (gh, gw, gb)
        ctx.rows, ctx.hidden_meta = rows, (hidden2d.shape, hidden2d.dtype)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(logps)
        loss = spec.loss(logps)
        return loss, logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps):
        refuse_double_backward()
        if ctx.grads is None:
            raise RuntimeError(
                "tspin_kernels: the fused loss's backward can run once per forward (its gradients were computed in "
                "the forward and are handed over, not kept). To backward twice through one graph, use fused=False."
            )
        gh, gw, gb = ctx.grads
        ctx.grads = None
        (N, D), h_dtype = ctx.hidden_meta
        g = grad_loss.detach()
        grad_h = grad_w = grad_b = None
        if gh is not None:
            gh.mul_(g.to(gh.dtype))
            full = torch.zeros((N, D), dtype=gh.dtype, device=gh.device)
            grad_h = full.index_add_(0, ctx.rows, gh).to(h_dtype)  # index_add: a shared row may repeat
        if gw is not None:
            grad_w = gw.mul_(g.to(gw.dtype)).to(ctx.weight_dtype)
        if gb is not None:
            grad_b = gb.mul_(g.to(gb.dtype)).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None


def _tuple_counts(spec: TupleLoss, seq_id: torch.Tensor, num_seqs: int, validate: bool) -> list[int]:
    """Counted positions per tuple, on the host: they size the chunks.

    From the caller's ``spec.seq_counts`` when given (no host sync; their total is checked against the number of
    counted positions, which the host knows), else read back from the device (one host sync). With ``validate``
    the device counts are read anyway and must equal the caller's."""
    B = num_seqs // spec.K
    given = spec.seq_counts
    if given is not None and sum(given) != seq_id.numel():
        raise ValueError(f"seq_counts: they add up to {sum(given)} counted positions, the labels hold "
                         f"{seq_id.numel()}")
    if given is None or validate:
        per_seq = torch.zeros(num_seqs, dtype=torch.long, device=seq_id.device)
        per_seq = per_seq.index_add_(0, seq_id, torch.ones_like(seq_id)).tolist()  # the one host sync
        if given is not None and list(given) != per_seq:
            s = next(i for i, (a, b) in enumerate(zip(given, per_seq)) if a != b)
            raise ValueError(f"seq_counts: sequence {s} has {per_seq[s]} counted positions in the labels, "
                             f"seq_counts says {given[s]}")
        given = per_seq
    return [sum(given[k * B + t] for k in range(spec.K)) for t in range(B)]


def run_fused(spec: TupleLoss, c, weight, bias, impl: str, options,
              validate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, detached per-sequence log-probs) of ``spec`` over the compacted rows ``c`` (``_tensors.Compacted``)."""
    if impl == "triton":
        from .kernels.fused_loss import TritonEngine  # imports triton lazily: the torch path works without it

        engine = TritonEngine
    else:
        engine = TorchEngine
    return FusedTupleLoss.apply(c.hidden2d, weight, bias, c.row_idx, c.target, c.seq_id, c.token_scale, c.num_seqs,
                                options, spec, engine, torch.is_grad_enabled(), validate)
