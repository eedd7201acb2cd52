"""autograd.Function wrapper around the Triton launchers (the torch fallback's Function is in ``reference``)."""

from __future__ import annotations

import torch

from . import _device
from .kernels.fused_logps import logps_backward, logps_backward_matmul, logps_forward
from .reference import finish_forward


class TritonSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, row_idx, target, seq_id, token_scale, num_seqs: int):
        tok, lse = logps_forward(hidden2d, weight, bias, row_idx, target)
        # read at forward time, so a caller's setting covers the backward that autograd runs later
        ctx.strategy, ctx.filter_eps = _device.backward_strategy(), _device.grad_filter_eps()
        if ctx.strategy == "matmul" and ctx.filter_eps > 0:
            raise ValueError("TSPIN_GRAD_FILTER skips tiles of the atomic backward only; unset it or "
                             "TSPIN_BACKWARD=matmul")
        return finish_forward(ctx, tok, lse, hidden2d, weight, bias, row_idx, target, seq_id, token_scale, num_seqs)

    @staticmethod
    def backward(ctx, grad_out):
        hidden2d, weight, bias, row_idx, target, seq_id, token_scale, lse = ctx.saved_tensors
        g_row = (grad_out.float()[seq_id] * token_scale).contiguous()
        need = dict(
            need_h=ctx.needs_input_grad[0],
            need_w=ctx.needs_input_grad[1],  # False for a frozen head: no weight-gradient work at all
            need_b=ctx.has_bias and ctx.needs_input_grad[2],
        )
        if ctx.strategy == "matmul":
            grad_h, grad_w, grad_b = logps_backward_matmul(hidden2d, weight, bias, row_idx, target, lse, g_row,
                                                           **need)
        else:
            grad_h, grad_w, grad_b = logps_backward(hidden2d, weight, bias, row_idx, target, lse, g_row, **need,
                                                    filter_eps=ctx.filter_eps)
        return grad_h, grad_w, grad_b, None, None, None, None, None
