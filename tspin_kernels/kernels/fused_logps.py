"""Fused LM-head + log-softmax + gather, forward and backward, over compacted rows.

Forward: each program owns BLOCK_M counted rows and one contiguous slice of the vocabulary; it walks the slice in
BLOCK_N tiles, computing each logit tile as H[rows] @ W[tile]^T with float32 accumulation, and keeps an online
(max, sum-exp) pair plus the target logit. Slices ("splits") exist to fill the GPU when there are few rows;
their partial log-sum-exps are merged by the launcher, which also reduces token log-probs per sequence.
Only the per-row log-sum-exp is kept for backward; the [rows x V] logits never exist in memory.

Backward: one program per (row block, vocab tile) recomputes the logit tile, forms
dlogits = g_row * (onehot(target) - softmax), and adds dlogits @ W into grad_hidden and dlogits^T @ H into
grad_weight with float32 atomics (into float32 buffers; low-precision atomics are never used). The weight
gradient work is compiled out when the head is frozen. For 16-bit weights the float32 weight-gradient buffer
covers one slice of the vocabulary at a time (one launch per slice, cast into the output as it finishes), so the
scratch stays at GW_SCRATCH_ELEMENTS instead of a float32 copy of the whole [V, D] head (2 GiB at 128K x 4096).

Matmul backward (``backward="matmul"``): the same recomputed dlogits, written per (vocab slice, row chunk)
block in the weight's dtype by ``_dlogits_kernel``; grad_hidden and grad_weight are then plain matmuls with
float32 results. No atomics, at the cost of a DL_BLOCK_ELEMENTS block. Which one is faster is the GPU's to say
(benchmarks/tile_sweep.py times both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _device
from ..reference import mm_f32

# float32 elements of weight-gradient scratch held at once for 16-bit heads (2**25 = 128 MiB: 8192 vocab rows at
# D=4096). Each slice is one launch over (its vocab tiles x every row block), plenty to fill the GPU.
GW_SCRATCH_ELEMENTS = 2**25


@triton.jit
def _logit_tile(H, W, B, hrow, rmask, cols, cmask, D, stride_hn, stride_hd, stride_wv, stride_wd,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """float32 logits for rows ``hrow`` (int64 row offsets) x vocab ``cols``; out-of-range entries are garbage."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        h = tl.load(H + hrow[:, None] * stride_hn + ks[None, :].to(tl.int64) * stride_hd,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + cols[None, :].to(tl.int64) * stride_wv + ks[:, None].to(tl.int64) * stride_wd,
                    mask=cmask[None, :] & kmask[:, None], other=0.0)
        if UPCAST:  # the interpreter's low-precision dot is wrong; upcast there
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_kernel(H, W, B, ROW_IDX, TGT, LSE_PART, TGT_PART, Nc, V, D, cols_per_split, num_splits,
                stride_hn, stride_hd, stride_wv, stride_wd,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Nc
    hrow = tl.load(ROW_IDX + rows, mask=rmask, other=0).to(tl.int64)
    tgt = tl.load(TGT + rows, mask=rmask, other=-1).to(tl.int64)
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        cmask = cols < v_hi
        logits = _logit_tile(H, W, B, hrow, rmask, cols, cmask, D, stride_hn, stride_hd, stride_wv, stride_wd,
                             HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION)
        logits = tl.where(cmask[None, :], logits, float("-inf"))
        t += tl.sum(tl.where(cols[None, :].to(tl.int64) == tgt[:, None], logits, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
    out = rows * num_splits + pid_s
    tl.store(LSE_PART + out, m + tl.log(s), mask=rmask)
    tl.store(TGT_PART + out, t, mask=rmask)


@triton.jit
def _tile_dlogits(H, W, B, ROW_IDX, TGT, LSE, GROW, Nc, V_LO, V_HI, D, stride_hn, stride_hd, stride_wv, stride_wd,
                  HAS_BIAS: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """This program's (row block, vocab tile) of the backward grid and its recomputed float32
    dlogits = g_row * (onehot(target) - softmax), zero outside the valid rows and columns [V_LO, V_HI)."""
    # grouped ordering: consecutive programs share vocab tiles of W, so they stay in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(Nc, BLOCK_M)
    num_n = tl.cdiv(V_HI - V_LO, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Nc
    hrow = tl.load(ROW_IDX + rows, mask=rmask, other=0).to(tl.int64)
    tgt = tl.load(TGT + rows, mask=rmask, other=-1).to(tl.int64)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    g = tl.load(GROW + rows, mask=rmask, other=0.0)
    cols = V_LO + pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < V_HI
    logits = _logit_tile(H, W, B, hrow, rmask, cols, cmask, D, stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION)
    p = tl.exp(logits - lse[:, None])
    onehot = cols[None, :] == tgt[:, None]
    d = g[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    d = tl.where(rmask[:, None] & cmask[None, :], d, 0.0)
    return rows, rmask, hrow, cols, cmask, d, p, onehot


@triton.jit
def _bwd_kernel(H, W, B, ROW_IDX, TGT, LSE, GROW, SLOT, GH, GW, GB, Nc, V_LO, V_HI, D, filter_eps,
                stride_hn, stride_hd, stride_wv, stride_wd,
                HAS_BIAS: tl.constexpr, COMPUTE_GH: tl.constexpr, COMPUTE_GW: tl.constexpr,
                COMPUTE_GB: tl.constexpr, FILTER: tl.constexpr, HAS_SLOTS: tl.constexpr, GROUP_M: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    rows, rmask, hrow, cols, cmask, d, p, onehot = _tile_dlogits(
        H, W, B, ROW_IDX, TGT, LSE, GROW, Nc, V_LO, V_HI, D, stride_hn, stride_hd, stride_wv, stride_wd,
        HAS_BIAS, GROUP_M, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION)
    if HAS_SLOTS:  # a hidden row counted several times: every repeat adds into the slot of its first occurrence
        gh_rows = tl.load(SLOT + rows, mask=rmask, other=0).to(tl.int64)
    else:
        gh_rows = rows
    if FILTER:
        # opt-in: a tile with no target whose softmax is negligible everywhere adds ~nothing; skip its matmuls
        live = tl.where(rmask[:, None] & cmask[None, :] & ((p >= filter_eps) | onehot), 1, 0)
        if tl.max(tl.max(live, axis=1), axis=0) > 0:
            _accumulate_grads(d, H, W, GH, GW, GB, hrow, gh_rows, rmask, cols, cmask, V_LO, D,
                              stride_hn, stride_hd, stride_wv, stride_wd, COMPUTE_GH, COMPUTE_GW, COMPUTE_GB,
                              BLOCK_K, UPCAST, DOT_PRECISION)
    else:
        _accumulate_grads(d, H, W, GH, GW, GB, hrow, gh_rows, rmask, cols, cmask, V_LO, D,
                          stride_hn, stride_hd, stride_wv, stride_wd, COMPUTE_GH, COMPUTE_GW, COMPUTE_GB,
                          BLOCK_K, UPCAST, DOT_PRECISION)


@triton.jit
def _accumulate_grads(d, H, W, GH, GW, GB, hrow, gh_rows, rmask, cols, cmask, V_LO, D,
                      stride_hn, stride_hd, stride_wv, stride_wd,
                      COMPUTE_GH: tl.constexpr, COMPUTE_GW: tl.constexpr, COMPUTE_GB: tl.constexpr,
                      BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add one dlogits tile's contributions: GH[gh_rows] += d @ W[cols], GW[cols - V_LO] += d^T @ H[hrow] (GW
    holds the launch's vocab slice only), GB[cols] += sum d."""
    if COMPUTE_GB:
        # every atomic here is a relaxed reduction: the sums need atomicity only, and Triton's default (acq_rel)
        # makes each one an ordered atom that waits for its old value
        tl.atomic_add(GB + cols, tl.sum(d, axis=0), mask=cmask, sem="relaxed")
    if UPCAST:
        dl = d
    else:
        dl = d.to(H.dtype.element_ty)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        if COMPUTE_GH:
            w = tl.load(W + cols[:, None] * stride_wv + ks[None, :].to(tl.int64) * stride_wd,
                        mask=cmask[:, None] & kmask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            gh = tl.dot(dl, w, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_K)
            tl.atomic_add(GH + gh_rows[:, None] * D + ks[None, :], gh, mask=rmask[:, None] & kmask[None, :],
                          sem="relaxed")
        if COMPUTE_GW:
            h = tl.load(H + hrow[:, None] * stride_hn + ks[None, :].to(tl.int64) * stride_hd,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            gw = tl.dot(tl.trans(dl), h, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_K)
            tl.atomic_add(GW + (cols - V_LO)[:, None] * D + ks[None, :], gw, mask=cmask[:, None] & kmask[None, :],
                          sem="relaxed")


@triton.jit
def _dlogits_kernel(H, W, B, ROW_IDX, TGT, LSE, GROW, DL, Nc, V_LO, V_HI, D,
                    stride_hn, stride_hd, stride_wv, stride_wd, stride_dl,
                    HAS_BIAS: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """DL[r, c - V_LO] = g_r * (onehot - softmax) for counted rows r < Nc and vocab columns c in [V_LO, V_HI),
    in DL's dtype: the matmul backward's input, so grad_hidden and grad_weight are plain (cuBLAS) products."""
    rows, rmask, hrow, cols, cmask, d, p, onehot = _tile_dlogits(
        H, W, B, ROW_IDX, TGT, LSE, GROW, Nc, V_LO, V_HI, D, stride_hn, stride_hd, stride_wv, stride_wd,
        HAS_BIAS, GROUP_M, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION)
    tl.store(DL + rows[:, None] * stride_dl + (cols - V_LO)[None, :], d.to(DL.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def tile_config(capability: tuple[int, int], dtype: torch.dtype, shared_limit: int) -> dict:
    """Fixed tile sizes per GPU class. Each is compiled on CPU for sm_80/86/90 and checked to fit that class's
    shared memory without spilling (``python -m benchmarks.kernel_resources``, run by the tests)."""
    wide = dtype == torch.float32  # float32 tiles need twice the shared memory per pipeline stage
    if capability[0] >= 9 and shared_limit >= 200_000:  # H100/H200: wgmma over 2 warpgroups, deep K tiles
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32 if wide else 64, num_warps=8, num_stages=3)
    if shared_limit >= 160_000:  # A100-class
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=3)
    # ~99 KB parts (RTX 30xx/40xx, A10, L4) and older
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16 if wide else 32, num_warps=4, num_stages=3)


def _config(device: torch.device, dtype: torch.dtype, kernel: str, tiles: dict | None = None) -> dict:
    """Tiles for ``kernel`` ("fwd"/"bwd"): ``tiles`` (a checked dict of TILE_KEYS) if given, else the built-in
    choice for this GPU."""
    if tiles is not None:
        return dict(tiles)
    if _device.interpreting():  # numpy per program: small tiles keep the CPU tests fast
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    cap = _device.cuda_capability(device)
    return tile_config(cap, dtype, _device.shared_memory_limit(cap, device))


def _dot_precision(weight) -> str:
    # float32 inputs follow torch's own TF32 switch; for 16-bit inputs the setting is moot (Triton's default)
    if weight.dtype == torch.float32 and not _device.allow_tf32():
        return "ieee"
    return "tf32"


def _launch_kw(cfg):
    return {} if _device.interpreting() else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def logps_forward(hidden2d, weight, bias, row_idx, target, tiles=None):
    """Per counted row: (token log-prob, log-sum-exp), both float32 of shape (Nc,). ``tiles``: see ``_config``."""
    Nc, (V, D) = row_idx.numel(), weight.shape
    dev = hidden2d.device
    if Nc == 0:
        z = torch.zeros(0, dtype=torch.float32, device=dev)
        return z, z.clone()
    cfg = _config(dev, weight.dtype, "fwd", tiles)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_m = triton.cdiv(Nc, BM)
    # split the vocabulary until there are ~2 programs per SM, each split at least 8 tiles wide
    max_splits = max(1, triton.cdiv(V, 8 * BN))
    num_splits = min(max_splits, max(1, triton.cdiv(2 * _device.num_sms(dev), num_m)))
    cols_per_split = triton.cdiv(triton.cdiv(V, num_splits), BN) * BN
    num_splits = triton.cdiv(V, cols_per_split)
    lse_part = torch.empty((Nc, num_splits), dtype=torch.float32, device=dev)
    tgt_part = torch.empty((Nc, num_splits), dtype=torch.float32, device=dev)
    _fwd_kernel[(num_m, num_splits)](
        hidden2d, weight, bias if bias is not None else weight, row_idx, target, lse_part, tgt_part,
        Nc, V, D, cols_per_split, num_splits,
        hidden2d.stride(0), hidden2d.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=cfg["BLOCK_K"],
        UPCAST=_device.interpreting(), DOT_PRECISION=_dot_precision(weight), **_launch_kw(cfg),
    )
    lse = torch.logsumexp(lse_part, dim=1) if num_splits > 1 else lse_part[:, 0]
    tok = tgt_part.sum(1) - lse  # the target lies in exactly one split; the others contribute 0
    return tok, lse


def _grad_buffers(Nc, V, D, dtype, dev, need_h, need_w, need_b):
    """float32 accumulators for grad_hidden's counted rows and the bias, and the (contiguous) weight gradient."""
    gh = torch.zeros((Nc, D), dtype=torch.float32, device=dev) if need_h else None
    grad_w = torch.zeros((V, D), dtype=dtype, device=dev) if need_w else None
    gb = torch.zeros((V,), dtype=torch.float32, device=dev) if need_b else None
    return gh, grad_w, gb


def _finish_grads(hidden2d, row_idx, bias, gh, grad_w, gb, grad_slot=None):
    """Scatter the counted rows' grad_hidden into a full (N, D) gradient (zero elsewhere); cast to input dtypes.
    With ``grad_slot`` a repeated row's sum sits in its first occurrence's slot and its other slots hold zeros, so
    an index_add (adding exact zeros, in any order) puts the float32 sum, rounded once, in place."""
    grad_h = None
    if gh is not None:
        grad_h = torch.zeros_like(hidden2d)
        if grad_slot is None:
            grad_h.index_copy_(0, row_idx, gh.to(hidden2d.dtype))
        else:
            grad_h.index_add_(0, row_idx, gh.to(hidden2d.dtype))
    return grad_h, grad_w, gb.to(bias.dtype) if gb is not None else None


def _slice_ranges(V: int, D: int, BN: int) -> list[tuple[int, int]]:
    """[lo, hi) vocab ranges whose float32 [width, D] weight-gradient scratch holds GW_SCRATCH_ELEMENTS."""
    cols = max(BN, GW_SCRATCH_ELEMENTS // D // BN * BN)
    return [(lo, min(lo + cols, V)) for lo in range(0, V, cols)]


def _vocab_slices(V: int, D: int, BN: int, need_w: bool, weight_dtype: torch.dtype) -> list[tuple[int, int]]:
    """The atomic backward's launches: all of V unless a 16-bit head's float32 scratch is sliced."""
    if not need_w or weight_dtype == torch.float32:  # float32: the scratch is the output itself
        return [(0, V)]
    return _slice_ranges(V, D, BN)


def logps_backward(hidden2d, weight, bias, row_idx, target, lse, g_row, need_h, need_w, need_b, filter_eps=0.0,
                   tiles=None, grad_slot=None):
    """Gradients w.r.t. hidden2d (full (N, D), zero on uncounted rows), weight and bias, given d out / d token.

    ``grad_slot``: ``(Nc,)`` for rows that may repeat (``positions.first_occurrence``), else None.

    ``filter_eps > 0`` skips vocab tiles whose softmax is below it for every row (and hold no target).
    ``tiles``: see ``_config``.
    """
    Nc, (V, D) = row_idx.numel(), weight.shape
    dev = hidden2d.device
    gh, grad_w, gb = _grad_buffers(Nc, V, D, weight.dtype, dev, need_h, need_w, need_b)
    if Nc > 0 and (need_h or need_w or need_b):
        cfg = _config(dev, weight.dtype, "bwd", tiles)
        BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
        dummy = lse
        for lo, hi in _vocab_slices(V, D, BN, need_w, weight.dtype):
            gw = None
            if need_w:
                gw = grad_w if grad_w.dtype == torch.float32 else torch.zeros((hi - lo, D), dtype=torch.float32,
                                                                              device=dev)
            grid = (triton.cdiv(Nc, BM) * triton.cdiv(hi - lo, BN),)
            _bwd_kernel[grid](
                hidden2d, weight, bias if bias is not None else weight, row_idx, target, lse, g_row,
                grad_slot if grad_slot is not None else row_idx,
                gh if need_h else dummy, gw if need_w else dummy, gb if need_b else dummy, Nc, lo, hi, D,
                float(filter_eps), hidden2d.stride(0), hidden2d.stride(1), weight.stride(0), weight.stride(1),
                HAS_BIAS=bias is not None, COMPUTE_GH=need_h, COMPUTE_GW=need_w, COMPUTE_GB=need_b,
                FILTER=filter_eps > 0, HAS_SLOTS=grad_slot is not None, GROUP_M=8,
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=cfg["BLOCK_K"], UPCAST=_device.interpreting(),
                DOT_PRECISION=_dot_precision(weight), **_launch_kw(cfg),
            )
            if need_w and gw is not grad_w:
                grad_w[lo:hi].copy_(gw)  # round once, after the slice's float32 sum is complete
                del gw
    return _finish_grads(hidden2d, row_idx, bias, gh, grad_w, gb, grad_slot)


# bf16/fp16 elements of the matmul backward's dlogits block (rows x vocab slice) held at once (2**25 = 64 MiB)
DL_BLOCK_ELEMENTS = 2**25


def logps_backward_matmul(hidden2d, weight, bias, row_idx, target, lse, g_row, need_h, need_w, need_b,
                          tiles=None, grad_slot=None):
    """Same contract as ``logps_backward``, without atomics: per (vocab slice, row chunk) a Triton kernel
    recomputes the logits and writes dlogits in the weight's dtype, then grad_hidden += dl @ W[slice] and
    grad_weight[slice] += dl^T @ H[rows] are ordinary matmuls, summed in float32 across chunks and slices."""
    Nc, (V, D) = row_idx.numel(), weight.shape
    dev, dt = hidden2d.device, weight.dtype
    gh, grad_w, gb = _grad_buffers(Nc, V, D, dt, dev, need_h, need_w, need_b)
    if Nc > 0 and (need_h or need_w or need_b):
        cfg = _config(dev, dt, "bwd", tiles)
        BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
        slices = _slice_ranges(V, D, BN)  # sliced for every dtype: the width bounds the dlogits block too
        width = max(hi - lo for lo, hi in slices)
        chunk = max(BM, DL_BLOCK_ELEMENTS // width // BM * BM)
        # the interpreter rounds float32 -> bf16 by truncation (GPUs round to nearest): store float32 there and
        # let torch round, so the CPU tests see the GPU's numerics
        dl = torch.empty((min(chunk, Nc), width), dtype=torch.float32 if _device.interpreting() else dt, device=dev)
        for lo, hi in slices:
            gw = torch.zeros((hi - lo, D), dtype=torch.float32, device=dev) if need_w else None
            for r0 in range(0, Nc, chunk):
                r1 = min(r0 + chunk, Nc)
                rows = row_idx[r0:r1]
                grid = (triton.cdiv(r1 - r0, BM) * triton.cdiv(hi - lo, BN),)
                _dlogits_kernel[grid](
                    hidden2d, weight, bias if bias is not None else weight, rows, target[r0:r1], lse[r0:r1],
                    g_row[r0:r1], dl, r1 - r0, lo, hi, D,
                    hidden2d.stride(0), hidden2d.stride(1), weight.stride(0), weight.stride(1), dl.stride(0),
                    HAS_BIAS=bias is not None, GROUP_M=8, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=cfg["BLOCK_K"],
                    UPCAST=_device.interpreting(), DOT_PRECISION=_dot_precision(weight), **_launch_kw(cfg),
                )
                d = dl[: r1 - r0, : hi - lo].to(dt)
                if need_h and grad_slot is None:  # float32 products, summed in float32 over slices and chunks
                    gh[r0:r1] += mm_f32(d, weight[lo:hi])
                elif need_h:  # repeated rows: each repeat into its first occurrence's slot
                    gh.index_add_(0, grad_slot[r0:r1], mm_f32(d, weight[lo:hi]))
                if need_w:
                    gw += mm_f32(d.t(), hidden2d.index_select(0, rows))
                if need_b:
                    gb[lo:hi] += d.float().sum(0)
            if need_w:
                grad_w[lo:hi].copy_(gw)
                del gw
    return _finish_grads(hidden2d, row_idx, bias, gh, grad_w, gb, grad_slot)
