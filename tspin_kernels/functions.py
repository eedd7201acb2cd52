"""autograd.Function wrapper around the Triton launchers (the torch fallback's Function is in ``reference``)."""

from __future__ import annotations

import torch

from .kernels.fused_logps import logps_backward, logps_backward_matmul, logps_forward
from .positions import first_occurrence
from .reference import finish_forward, refuse_double_backward


class TritonSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, row_idx, target, seq_id, token_scale, num_seqs: int,
                unique_rows: bool, options):
        tok, lse = logps_forward(hidden2d, weight, bias, row_idx, target, tiles=options.tiles_fwd)
        ctx.options = options  # the forward's options drive the backward that autograd runs later
        ctx.unique_rows = unique_rows
        return finish_forward(ctx, tok, lse, hidden2d, weight, bias, row_idx, target, seq_id, token_scale, num_seqs)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward()
        hidden2d, weight, bias, row_idx, target, seq_id, token_scale, lse = ctx.saved_tensors
        g_row = (grad_out.float()[seq_id] * token_scale).contiguous()
        opts = ctx.options
        need = dict(
            # a repeated row's contributions are summed in one float32 slot (its first occurrence)
            grad_slot=None if ctx.unique_rows else first_occurrence(row_idx),
            need_h=ctx.needs_input_grad[0],
            need_w=ctx.needs_input_grad[1],  # False for a frozen head: no weight-gradient work at all
            need_b=ctx.has_bias and ctx.needs_input_grad[2],
        )
        if opts.backward == "matmul":
            grad_h, grad_w, grad_b = logps_backward_matmul(hidden2d, weight, bias, row_idx, target, lse, g_row,
                                                           **need, tiles=opts.tiles_bwd)
        else:
            grad_h, grad_w, grad_b = logps_backward(hidden2d, weight, bias, row_idx, target, lse, g_row, **need,
                                                    filter_eps=opts.grad_filter_eps, tiles=opts.tiles_bwd)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None
