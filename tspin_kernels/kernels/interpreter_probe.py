"""A one-loop kernel run once under ``TRITON_INTERPRET=1`` to tell whether Triton's CPU interpreter works here.

Some Triton/numpy pairs cannot interpret even a loop over a scalar argument (Triton 3.6 with numpy >= 2.4: its
scalars are 1-element arrays, which newer numpy refuses to turn into ints). Running this first turns that into
one clear error instead of an InterpreterError from inside our kernels.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _sum_kernel(X, OUT, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n, BLOCK):
        acc += tl.load(X + i + tl.arange(0, BLOCK))
    tl.store(OUT, tl.sum(acc, axis=0))


@functools.cache
def interpreter_error() -> str | None:
    """None when the interpreter runs a scalar-bounded loop correctly, else what went wrong."""
    x, out = torch.ones(32), torch.zeros(1)
    try:
        _sum_kernel[(1,)](x, out, 32, BLOCK=16)
    except Exception as e:  # any failure here means the interpreter is unusable
        return f"{type(e).__name__}: {e}"
    return None if out.item() == 32.0 else f"a 32-element sum came out as {out.item()}"
