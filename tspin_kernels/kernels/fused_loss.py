"""Triton epilogues of the fused loss path (``tspin_kernels/fused_loss.py``): cuBLAS products, Triton row work.

Per chunk of whole tuples the three products are cuBLAS matmuls (logits with a float32 result; dlogits @ W and
dlogits^T @ H with float32 results), and these kernels do what lies between them, reading the chunk's float32
logits once each:

- ``_row_lse_kernel``: per row, an online (max, sum-exp) over the vocabulary and the target logit -> log-sum-exp
  and target log-prob;
- ``_loss_dlogits_kernel``: per (row block, vocab block) tile, dlogits = g_row * (onehot(target) - softmax), written
  in the weight's dtype (in place over the logits for a float32 head), and the tile's column sums for the bias
  gradient (one partial row per row block, summed by torch: no atomics anywhere).

grad_hidden of the chunk's rows is the output of its product, written once (no per-element atomics); the rows are
scattered into the (N, D) gradient by one ``index_add_`` in the backward (a shared-prefix row may repeat).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _device


@triton.jit
def _row_lse_kernel(LOGITS, TGT, LSE, TOK, n, V, stride, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    tgt = tl.load(TGT + rows, mask=rmask, other=-1).to(tl.int64)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        # rows past n read 0 (finite, never stored): no -inf - -inf in their online max
        x = tl.load(LOGITS + rows[:, None] * stride + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        x = tl.where(cmask[None, :], x, float("-inf"))
        t += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(TOK + rows, t - lse, mask=rmask)


@triton.jit
def _loss_dlogits_kernel(LOGITS, TGT, LSE, GTOK, OUT, COLSUM, n, V, stride_l, stride_o,
                         HAS_COLSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    pid_m = tl.program_id(0)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < n
    cmask = cols < V
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(LOGITS + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)
    tgt = tl.load(TGT + rows, mask=rmask, other=-1).to(tl.int64)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    g = tl.load(GTOK + rows, mask=rmask, other=0.0)
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    d = tl.where(mask, g[:, None] * (onehot - tl.exp(x - lse[:, None])), 0.0)
    tl.store(OUT + rows[:, None] * stride_o + cols[None, :], d.to(OUT.dtype.element_ty), mask=mask)
    if HAS_COLSUM:
        tl.store(COLSUM + pid_m.to(tl.int64) * V + cols, tl.sum(d, axis=0), mask=cmask)


def _blocks(kernel: str) -> dict:
    if _device.interpreting():  # numpy per program: few, wide programs keep the CPU tests fast
        return dict(BLOCK_M=16, BLOCK_V=128)
    # memory-bound row work: wide vocab tiles, a few rows per program
    return dict(BLOCK_M=4, BLOCK_V=2048, num_warps=8) if kernel == "lse" else dict(BLOCK_M=16, BLOCK_V=512,
                                                                                   num_warps=8)


class TritonEngine:
    """The fused loss path's row work as Triton kernels (same interface as ``fused_loss.TorchEngine``)."""

    @staticmethod
    def reduce(logits, tgt):
        n, V = logits.shape
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        tok = torch.empty_like(lse)
        cfg = _blocks("lse")
        _row_lse_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](logits, tgt, lse, tok, n, V, logits.stride(0), **cfg)
        return lse, tok, None  # the logits stay as they are

    @staticmethod
    def recomputed(logits, lse):
        return None

    @staticmethod
    def dlogits(logits, state, lse, tgt, g_tok, weight, need_b):
        n, V = logits.shape
        cfg = _blocks("dlogits")
        # float32 heads: in place over the logits. 16-bit heads: a 16-bit buffer on the GPU; the interpreter rounds
        # float32 -> bf16 by truncation (GPUs round to nearest), so there it writes float32 and torch rounds
        low = weight.dtype not in (torch.float32, torch.float64)
        out = torch.empty((n, V), dtype=weight.dtype, device=logits.device) if low and logits.is_cuda else logits
        num_m = triton.cdiv(n, cfg["BLOCK_M"])
        colsum = torch.empty((num_m, V), dtype=torch.float32, device=logits.device) if need_b else lse
        _loss_dlogits_kernel[(num_m, triton.cdiv(V, cfg["BLOCK_V"]))](
            logits, tgt, lse, g_tok.float().contiguous(), out, colsum, n, V, logits.stride(0), out.stride(0),
            HAS_COLSUM=need_b, **cfg)
        if low and out.dtype != weight.dtype:
            out = out.to(weight.dtype)
        return out, colsum.sum(0) if need_b else None
