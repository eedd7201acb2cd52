"""Public functional API: per-sequence log-probs and the T-SPIN / SPIN losses on top of them."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _device
from ._defaults import LossPath, kernel_options
from ._inputs import check_cu_seqlens_layout, check_inputs, compact
from ._options import check_flag, check_fused, check_real, check_seq_counts
from ._tensors import check_not_meta, check_tensor, fail_type
from .fused_loss import TupleLoss, run_fused
from .positions import CountedPositions, compact_positions
from .reference import ChunkedSequenceLogps, acc_dtype, naive_positions_logps, naive_sequence_logps


class TSPINOutput(NamedTuple):
    loss: torch.Tensor  # 0-d
    real_logps: torch.Tensor  # (B,) float32
    generated_logps: torch.Tensor
    proto_logps: torch.Tensor


class SPINOutput(NamedTuple):
    loss: torch.Tensor
    real_logps: torch.Tensor
    generated_logps: torch.Tensor


class TSPINNoHistoryOutput(NamedTuple):
    loss: torch.Tensor
    real_logps: torch.Tensor
    generated_logps: torch.Tensor


def sequence_logps(hidden, weight, labels, *, bias=None, cu_seqlens=None, ignore_index: int = -100,
                   shift: bool = False, average: bool = False, impl: str = "auto", backward: str | None = None,
                   grad_filter_eps: float | None = None, tiles: dict | None = None,
                   chunk_elements: int | None = None, validate: bool = True,
                   check_finite: bool = False) -> torch.Tensor:
    """Sum (or mean) of target-token log-probs per sequence, from hidden states and the LM-head weight.

    Args:
        hidden: ``(R, T, D)``, or packed ``(N, D)`` with ``cu_seqlens``; bf16, fp16 or fp32.
        weight: ``(V, D)`` LM-head weight, same dtype as ``hidden``.
        labels: ``(R, T)`` / ``(N,)`` integer targets aligned with ``hidden`` (``labels[t]`` is predicted from
            ``hidden[t]``), or Hugging Face style with ``shift=True``. ``ignore_index`` positions do not count.
            Or a :class:`tspin_kernels.CountedPositions`: the (hidden row, target, sequence) triples that count,
            given explicitly; a row may repeat (one prompt position predicting the first token of several
            responses) and its gradient is the sum over its repeats. ``hidden`` is then ``(N, D)`` or
            ``(R, T, D)`` (rows index it flattened), ``cu_seqlens`` is None and ``shift`` False.
        bias: optional ``(V,)``.
        cu_seqlens: ``(S+1,)`` int offsets of the packed sequences (non-decreasing, 0 to N).
        average: mean instead of sum over counted tokens (0 for a sequence with none).
        impl: ``"triton"``, ``"torch"`` (chunked, bounded memory), ``"reference"`` (full logits) or ``"auto"``
            (``TSPIN_IMPL`` if set, else triton on CUDA and torch elsewhere).
        backward: Triton path: ``"matmul"`` (a kernel writes dlogits blocks, cuBLAS does the two products, no
            atomics; 2.1-2.3x faster on an H200) or ``"atomic"`` (one fused kernel adding every logit tile's
            contributions with float32 atomics, the leanest, and the only one with ``grad_filter_eps``).
            ``None``: ``TSPIN_BACKWARD``, else ``"matmul"`` on CUDA and ``"atomic"`` elsewhere (``"atomic"``
            whenever ``grad_filter_eps > 0``).
        grad_filter_eps: Triton atomic backward: skip vocab tiles whose softmax is below this for every row and
            that hold no target (approximate gradients; 0 = exact). ``None``: ``TSPIN_GRAD_FILTER`` or 0.
        tiles: Triton path: ``{"fwd": ..., "bwd": ...}`` (either key optional), each ``"BLOCK_M,BLOCK_N,BLOCK_K,
            num_warps,num_stages"``, a sequence of those five ints or a dict with those keys, instead of the
            built-in per-GPU tiles. ``None`` entries: ``TSPIN_TILES_FWD`` / ``TSPIN_TILES_BWD`` or built-in.
        chunk_elements: torch path: float32 logit elements per row chunk (memory bound).
            ``None``: ``TSPIN_CHUNK_ELEMENTS``, else 2**28 (1 GiB) on CUDA and 2**23 (32 MiB) elsewhere.
        validate: ``True`` checks everything, including the values of ``labels`` (in ``[0, V)`` or
            ``ignore_index``) and ``cu_seqlens`` (0, non-decreasing, N), reduced on the device and read back in
            **one** host sync. ``False`` (the caller vouches for those values, e.g. checked on the CPU when the
            batch was built) keeps only the free checks (types, shapes, dtypes, devices): the call's only host
            sync is then the ``nonzero`` that compacts counted positions (CUDA; impl ``"reference"`` also reads
            ``cu_seqlens``). Out-of-range values under ``False`` give undefined results.
        check_finite: raise if ``hidden`` holds NaN/Inf (one more reduction, read back with the checks above;
            runs whatever ``validate`` says).

    Options that do not apply to the implementation that runs (``backward`` on the torch path,
    ``chunk_elements`` on Triton) are checked and otherwise ignored, so one set of options serves every device.

    Returns:
        float32 tensor of shape ``(S,)``, differentiable (once: double backward raises) w.r.t. ``hidden``,
        ``weight`` and ``bias``.
    """
    return _logps(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ignore_index=ignore_index, shift=shift,
                  average=average, impl=impl, backward=backward, grad_filter_eps=grad_filter_eps, tiles=tiles,
                  chunk_elements=chunk_elements, validate=validate, check_finite=check_finite)


def _logps(hidden, weight, labels, *, bias=None, cu_seqlens=None, ignore_index: int = -100, shift: bool = False,
           average: bool = False, impl: str = "auto", backward=None, grad_filter_eps=None, tiles=None,
           chunk_elements=None, validate: bool = True, check_finite: bool = False, path: LossPath | None = None,
           loss: TupleLoss | None = None):
    """:func:`sequence_logps` on ``path`` (None: resolved here, the recompute path); with ``loss`` (the fused path
    of a loss) ``(loss, detached log-probs)`` instead."""
    hidden, weight, bias = _autocast(hidden, weight, bias)
    for name, flag in (("shift", shift), ("average", average), ("validate", validate),
                       ("check_finite", check_finite)):
        check_flag(name, flag)
    explicit = isinstance(labels, CountedPositions)
    if explicit and shift:
        raise ValueError("shift: counted positions already name the row that predicts each target; pass shift=False")
    check_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index, validate=validate,
                 check_finite=check_finite)
    if path is None:
        path = _device.loss_path(hidden, impl=impl, fused=False, backward=backward, grad_filter_eps=grad_filter_eps,
                                 chunk_elements=chunk_elements)
    options = kernel_options(path, tiles)
    impl = path.impl
    if impl == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden: impl='triton' expects bfloat16, float16 or float32, got torch.float64")
    if impl == "reference":
        if explicit:
            return naive_positions_logps(hidden, weight, labels, bias=bias, average=average)
        return naive_sequence_logps(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens,
                                    ignore_index=ignore_index, shift=shift, average=average)
    if explicit:
        c = compact_positions(hidden, labels, average)
    else:
        c = compact(hidden, labels, cu_seqlens, ignore_index, shift, average)
    if loss is not None:  # a loss on the fused path: (loss, detached log-probs)
        return run_fused(loss, c, weight, bias, impl, options, validate)
    if impl == "triton":
        from .functions import TritonSequenceLogps  # imports triton lazily: the torch path works without it

        fn = TritonSequenceLogps
    else:
        fn = ChunkedSequenceLogps
    return fn.apply(c.hidden2d, weight, bias, c.row_idx, c.target, c.seq_id, c.token_scale, c.num_seqs,
                    c.unique_rows, options)


def loss_path(device, *, impl: str = "auto", fused: bool | None = None, backward: str | None = None,
              grad_filter_eps: float | None = None, chunk_elements: int | None = None) -> LossPath:
    """The path :func:`tspin_loss` / :func:`spin_loss` / :func:`tspin_no_history_loss` take on tensors living on
    ``device`` (a ``torch.device``, its name or a tensor) with these keyword options, as a :class:`LossPath`
    (``impl``, ``fused``, ``backward``, ``grad_filter_eps``, ``chunk_elements``): each option's keyword, else its
    environment variable, else the built-in default for the device type, the fastest path measured there.
    :func:`sequence_logps` takes the same path with ``fused=False`` (its log-probs have their own backward).
    Raises the call's own error for a bad option or an ``impl`` that cannot run there."""
    return _device.loss_path(device, impl=impl, fused=fused, backward=backward, grad_filter_eps=grad_filter_eps,
                             chunk_elements=chunk_elements)


def _autocast(hidden, weight, bias):
    """Under torch.autocast, compute in the autocast dtype as F.linear would (fp32 master weights, bf16 activations)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return hidden, weight, bias
    check_not_meta("hidden", hidden)  # before asking autocast about a device type it does not know
    dev = hidden.device.type
    if not torch.is_autocast_enabled(dev) or not hidden.is_floating_point():
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    return cast(hidden), cast(weight), cast(bias)


def _check_logps(**named) -> None:
    """Per-sequence log-prob vectors: 1-D floating tensors of one length (>= 1) on one device; no broadcasting."""
    first_name, first = next(iter(named.items()))
    check_not_meta(first_name, first)
    for name, t in named.items():
        check_tensor(name, t, "a 1-D floating torch.Tensor (B,)")
        if not t.dtype.is_floating_point:
            raise fail_type(name, "a floating dtype", t.dtype)
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor (B,) of per-sequence log-probs, got {tuple(t.shape)}")
        if t.shape != first.shape:
            raise ValueError(f"{name}: expected shape {tuple(first.shape)} like {first_name}, got {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name}: expected to be on {first.device} like {first_name}, got {t.device}")
    if first.numel() == 0:
        raise ValueError(f"{first_name}: expected at least one sequence, got shape (0,)")


def tspin_loss_from_logps(real, generated, proto, *, alpha: float = 1.0, beta: float = 0.1) -> torch.Tensor:
    """T-SPIN loss from per-sequence log-probs: l(a*(real-gen)) + b*l(a*(gen-proto)), mean over triplets.

    ``real`` / ``generated`` / ``proto``: 1-D floating ``(B,)`` tensors of one length (never broadcast);
    ``alpha`` / ``beta``: finite numbers. Every check is free (no host sync)."""
    alpha, beta = check_real("alpha", alpha), check_real("beta", beta)
    _check_logps(real=real, generated=generated, proto=proto)
    return _tspin_terms(real, generated, proto, alpha, beta).mean()


def _tspin_terms(real, generated, proto, alpha: float, beta: float) -> torch.Tensor:
    """Per-triplet T-SPIN losses (the one formula every path uses)."""
    current = alpha * (real - generated)
    history = alpha * (generated - proto)
    return -F.logsigmoid(current) - beta * F.logsigmoid(history)


def tspin_no_history_loss_from_logps(real, generated, *, alpha: float = 1.0) -> torch.Tensor:
    """T-SPIN without the history term from per-sequence log-probs: l(alpha*(real-gen)), mean over pairs. Inputs as
    in :func:`tspin_loss_from_logps` (1-D, one length, floating; ``alpha`` finite). Every check is free."""
    alpha = check_real("alpha", alpha)
    _check_logps(real=real, generated=generated)
    return _no_history_terms(real, generated, alpha).mean()


def _no_history_terms(real, generated, alpha: float) -> torch.Tensor:
    """Per-pair losses of T-SPIN without the history term (the one formula every path uses)."""
    return -F.logsigmoid(alpha * (real - generated))


def spin_loss_from_logps(real, generated, ref_real, ref_generated, *, beta: float = 0.1) -> torch.Tensor:
    """SPIN loss: l(beta*[(real - ref_real) - (gen - ref_gen)]), mean over pairs. Inputs as in
    :func:`tspin_loss_from_logps` (1-D, one length, floating; ``beta`` finite). Every check is free."""
    beta = check_real("beta", beta)
    _check_logps(real=real, generated=generated, ref_real=ref_real, ref_generated=ref_generated)
    return _spin_terms(real, generated, ref_real, ref_generated, beta).mean()


def _spin_terms(real, generated, ref_real, ref_generated, beta: float) -> torch.Tensor:
    """Per-pair SPIN losses (the one formula every path uses)."""
    return -F.logsigmoid(beta * ((real - ref_real) - (generated - ref_generated)))


def _rows(hidden, labels, cu_seqlens) -> int:
    if isinstance(labels, CountedPositions):
        return labels.num_seqs
    if cu_seqlens is None:
        return hidden.shape[0]
    check_cu_seqlens_layout(cu_seqlens, None)
    return cu_seqlens.numel() - 1


_PATH_OPTIONS = ("impl", "backward", "grad_filter_eps", "chunk_elements")
_OPTIONS = frozenset(("bias", "cu_seqlens", "ignore_index", "shift", "average", "tiles", "validate", "check_finite",
                      *_PATH_OPTIONS))  # sequence_logps' keywords after (hidden, weight, labels)


def _loss_and_logps(hidden, weight, labels, K: int, terms, fused, seq_counts, rows, options: dict):
    """``(loss, detached log-probs)`` on the fused path, ``(None, log-probs)`` on the recompute path (the caller
    puts the loss on them). The one place a loss's path is decided: ``_device.loss_path`` with the call's ``fused``
    and options. ``seq_counts`` is checked whichever path runs (free) and used only by the fused one."""
    check_fused(fused)
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise TypeError(f"{unknown[0]}: not an option of the losses (expected the keyword options of "
                        f"sequence_logps: {', '.join(sorted(_OPTIONS))})")
    counts = check_seq_counts(seq_counts, rows) if rows is not None else None
    if rows is None:  # hidden is not a tensor sequence_logps accepts: it names the bad argument
        return None, _logps(hidden, weight, labels, **options)
    path = _device.loss_path(hidden, fused=fused, **{k: options[k] for k in _PATH_OPTIONS if k in options})
    if path.fused:
        return _logps(hidden, weight, labels, **options, path=path, loss=TupleLoss(K, terms, counts))
    return None, _logps(hidden, weight, labels, **options, path=path)


def _rows_of(hidden, labels, options: dict, K: int, what: str) -> int | None:
    """The number of sequences (K per tuple) when ``hidden`` is a tensor the kernels take, else None."""
    if not (isinstance(hidden, torch.Tensor) and hidden.dim() in (2, 3)):
        return None
    rows = _rows(hidden, labels, options.get("cu_seqlens"))
    if rows == 0 or rows % K:
        raise ValueError(f"hidden: {what} needs {K}B rows {_ROWS[K]} with B>=1, got {rows} rows")
    return rows


_ROWS = {2: "[real; generated]", 3: "[real; generated; proto]"}


def tspin_loss(hidden, weight, labels, *, alpha: float = 1.0, beta: float = 0.1, fused: bool | None = None,
               seq_counts=None, **options) -> TSPINOutput:
    """T-SPIN loss over 3B rows ordered ``[real_0..real_{B-1}, generated_0.., proto_0..]``.

    ``options``: the keyword options of :func:`sequence_logps` (bias, cu_seqlens, ignore_index, shift, average,
    impl, backward, grad_filter_eps, tiles, chunk_elements, validate, check_finite). ``alpha`` / ``beta``: finite
    numbers.

    ``fused``: ``True`` computes the gradients inside the forward, one chunk of whole triplets at a time (3 units
    of work instead of 4; ``chunk_elements`` caps a chunk's float32 logits, default ``TSPIN_CHUNK_ELEMENTS`` or
    2**28, and a triplet above the cap takes two passes over its rows). Then only ``loss`` is differentiable: the
    returned log-probs are detached diagnostics. ``False``: per-sequence log-probs with their own backward (the
    recompute path, 4 units), the loss on top; everything returned is differentiable. ``None`` (default): the
    recompute path when the call names an option only it has (``backward=``, ``grad_filter_eps > 0``), else
    ``TSPIN_FUSED`` if set, else fused, except for ``impl="reference"`` and for ``impl="triton"`` in Triton's CPU
    interpreter. :func:`loss_path` tells which path a call takes.

    ``seq_counts``: each sequence's number of counted positions (after ``shift``), as host integers (a list,
    tuple or CPU tensor), when the caller knows them (e.g. counted while building the batch on the CPU). The
    fused path sizes its chunks of whole triplets from them; without them it reads them back from the device (one
    host sync). Their total is always checked (free); with ``validate=True`` each count is checked against the
    labels too. Wrong counts with the right total under ``validate=False`` give undefined gradients. The recompute
    path does not use them.
    """
    alpha, beta = check_real("alpha", alpha), check_real("beta", beta)
    rows = _rows_of(hidden, labels, options, 3, "tspin_loss")
    loss, logps = _loss_and_logps(hidden, weight, labels, 3, lambda x, t: _tspin_terms(x[0], x[1], x[2], alpha, beta),
                                  fused, seq_counts, rows, options)
    real, generated, proto = logps.chunk(3)
    if loss is None:
        loss = tspin_loss_from_logps(real, generated, proto, alpha=alpha, beta=beta)
    return TSPINOutput(loss, real, generated, proto)


def spin_loss(hidden, weight, labels, ref_logps, *, beta: float = 0.1, fused: bool | None = None,
              seq_counts=None, **options) -> SPINOutput:
    """SPIN loss over 2B rows ``[real; generated]``; ``ref_logps`` (2B,) are the frozen start-of-iteration log-probs.

    ``options``, ``fused`` and ``seq_counts`` as in :func:`tspin_loss` (the fused path chunks by pairs). With
    ``validate=True``
    (default) NaN/Inf in ``ref_logps`` raise (one more host sync when they live on the GPU); ``validate=False``
    skips that check.
    """
    beta = check_real("beta", beta)
    check_not_meta("hidden", hidden)  # before ref_logps' values are read
    rows = _rows_of(hidden, labels, options, 2, "spin_loss")
    ref2 = None
    if rows is not None:
        if not isinstance(ref_logps, torch.Tensor) or tuple(ref_logps.shape) != (rows,):
            got = tuple(ref_logps.shape) if isinstance(ref_logps, torch.Tensor) else type(ref_logps).__name__
            raise ValueError(f"ref_logps: expected a tensor of shape ({rows},) in the same row order, got {got}")
        if not ref_logps.dtype.is_floating_point:
            raise fail_type("ref_logps", "a floating dtype", ref_logps.dtype)
        if check_flag("validate", options.get("validate", True)) and not bool(torch.isfinite(ref_logps).all()):
            raise ValueError("ref_logps: contains NaN or Inf (reference log-probs must be finite)")
        ref2 = ref_logps.detach().to(hidden.device, acc_dtype(hidden.dtype)).view(2, -1)
    loss, logps = _loss_and_logps(hidden, weight, labels, 2,
                                  lambda x, t: _spin_terms(x[0], x[1], ref2[0, t], ref2[1, t], beta),
                                  fused, seq_counts, rows, options)
    real, generated = logps.chunk(2)
    if loss is None:
        ref_real, ref_generated = ref_logps.detach().float().to(logps.device).chunk(2)
        loss = spin_loss_from_logps(real, generated, ref_real, ref_generated, beta=beta)
    return SPINOutput(loss, real, generated)


def tspin_no_history_loss(hidden, weight, labels, *, alpha: float = 1.0, fused: bool | None = None,
                          seq_counts=None, **options) -> TSPINNoHistoryOutput:
    """T-SPIN without the history term (the paper's ablation, ``beta = 0`` throughout) over 2B rows
    ``[real; generated]``: ``l(alpha * (logp(real) - logp(generated)))``, mean over pairs. No proto rows are read
    and no reference model is needed. ``options``, ``fused`` and ``seq_counts`` as in :func:`tspin_loss` (the
    fused path chunks by pairs)."""
    alpha = check_real("alpha", alpha)
    rows = _rows_of(hidden, labels, options, 2, "tspin_no_history_loss")
    loss, logps = _loss_and_logps(hidden, weight, labels, 2, lambda x, t: _no_history_terms(x[0], x[1], alpha),
                                  fused, seq_counts, rows, options)
    real, generated = logps.chunk(2)
    if loss is None:
        loss = tspin_no_history_loss_from_logps(real, generated, alpha=alpha)
    return TSPINNoHistoryOutput(loss, real, generated)
