"""The implementations the benchmarks compare, each computing the same T-SPIN loss (and, via autograd, gradients).

Every peer is ``fn(hidden, weight, labels, head_trainable) -> 0-d loss`` with identical semantics: rows
``[real(B); generated(B); proto(B)]``, labels aligned with ``hidden`` (``labels[..., t]`` is predicted from
``hidden[..., t]``), ``ignore_index=-100``, per-sequence sum of token log-probs in float32, then
``l(alpha*(real-gen)) + beta*l(alpha*(gen-proto))`` averaged over triplets (alpha=1, beta=0.1).

``unavailable(name, device)`` says why a peer cannot run here (missing package, needs CUDA), or None.
CCE and Liger are optional imports: they are carried to the GPU machine as wheels (benchmarks/gpu_wheels.sh).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import torch

from tspin_kernels import _device, loss_path, tspin_loss, tspin_loss_from_logps

IGNORE_INDEX = -100
ALPHA, BETA = 1.0, 0.1


def _loss_from_logps(logps: torch.Tensor) -> torch.Tensor:
    real, generated, proto = logps.float().chunk(3)
    return tspin_loss_from_logps(real, generated, proto, alpha=ALPHA, beta=BETA)


# --------------------------------------------------------------------------------------------- ours
def ours_default(hidden, weight, labels, head_trainable=True):
    """The library's plain call, no options: the path the defaults resolve to on this device (``default_path``)."""
    return tspin_loss(hidden, weight, labels, alpha=ALPHA, beta=BETA).loss


def ours_triton(hidden, weight, labels, head_trainable=True):
    """Ours on the recompute path with the atomic backward (one fused kernel, float32 atomics)."""
    return tspin_loss(hidden, weight, labels, alpha=ALPHA, beta=BETA, impl="triton", fused=False,
                      backward="atomic").loss


def ours_triton_matmul(hidden, weight, labels, head_trainable=True):
    """Ours on the recompute path with ``backward="matmul"`` (dlogits blocks + cuBLAS products, no atomics)."""
    return tspin_loss(hidden, weight, labels, alpha=ALPHA, beta=BETA, impl="triton", fused=False,
                      backward="matmul").loss


def ours_triton_fused(hidden, weight, labels, head_trainable=True):
    """Ours with the fused loss path on the GPU: cuBLAS products + Triton epilogues, gradients in the forward."""
    return tspin_loss(hidden, weight, labels, alpha=ALPHA, beta=BETA, impl="triton", fused=True).loss


def ours_torch(hidden, weight, labels, head_trainable=True):
    """The torch path fused (3 units of work), its default on every device."""
    return tspin_loss(hidden, weight, labels, alpha=ALPHA, beta=BETA, impl="torch", fused=True).loss


def ours_torch_recompute(hidden, weight, labels, head_trainable=True):
    """The torch path with ``fused=False``: log-probs with their own backward, which recomputes the logits (4 units)."""
    return tspin_loss(hidden, weight, labels, alpha=ALPHA, beta=BETA, impl="torch", fused=False).loss


def default_path(device) -> tuple[str, dict]:
    """(the named peer the plain call equals on ``device``, the resolved ``tspin_kernels.LossPath`` as a dict)."""
    path = loss_path(device)
    if path.impl == "triton":
        name = "triton_fused" if path.fused else {"atomic": "triton", "matmul": "triton_mm"}[path.backward]
    else:
        name = {"torch": "torch" if path.fused else "torch_recompute", "reference": "reference"}[path.impl]
    return name, dataclasses.asdict(path)


def reference(hidden, weight, labels, head_trainable=True):
    """The oracle every peer is checked against (``impl="reference"``, full logits)."""
    return tspin_loss(hidden, weight, labels, alpha=ALPHA, beta=BETA, impl="reference").loss


# --------------------------------------------------------------------------------------------- naive torch
def naive_logps(hidden, weight, labels):
    """What a Hugging Face training loop does: full logits -> float -> log_softmax -> gather -> masked sum."""
    logits = (hidden @ weight.T).float()
    mask = labels != IGNORE_INDEX
    tok = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def naive(hidden, weight, labels, head_trainable=True):
    return _loss_from_logps(naive_logps(hidden, weight, labels))


def _naive_loss(hidden, weight, labels):
    return _loss_from_logps(naive_logps(hidden, weight, labels))


_compiled: dict = {}


def compiled(hidden, weight, labels, head_trainable=True):
    """``torch.compile`` of the naive loss (one compiled callable per head mode: requires_grad changes the graph)."""
    fn = _compiled.get(head_trainable)
    if fn is None:
        fn = _compiled[head_trainable] = torch.compile(_naive_loss, dynamic=False)
    return fn(hidden, weight, labels)


# --------------------------------------------------------------------------------------------- CCE
def _cce(hidden, weight, labels, filter_eps):
    from cut_cross_entropy import linear_cross_entropy

    nll = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="none",
                               filter_eps=filter_eps)
    return _loss_from_logps(-nll.float().masked_fill(labels == IGNORE_INDEX, 0.0).sum(-1))


def cce(hidden, weight, labels, head_trainable=True):
    """Apple's cut-cross-entropy: per-token NLL (``reduction="none"``, 0 at ignored positions), summed per row.

    ``filter_eps=None``: exact gradients, like every other peer (CCE's default skips vocab blocks whose softmax
    is below bf16 eps/32 in backward; that variant is ``cce_filter``).
    """
    return _cce(hidden, weight, labels, None)


def cce_filter(hidden, weight, labels, head_trainable=True):
    """CCE with its default gradient filtering (``filter_eps="high"``): approximate gradients, timed anyway."""
    return _cce(hidden, weight, labels, "high")


# --------------------------------------------------------------------------------------------- Liger
def liger(hidden, weight, labels, head_trainable=True):
    """Liger fused linear cross-entropy, ``reduction="none"`` (per-token upstream grads), summed per row."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    R, T, D = hidden.shape
    nll = liger_fused_linear_cross_entropy(hidden.reshape(R * T, D), weight, labels.reshape(R * T),
                                           ignore_index=IGNORE_INDEX, reduction="none")
    nll = nll.float().reshape(R, T).masked_fill(labels == IGNORE_INDEX, 0.0)
    return _loss_from_logps(-nll.sum(-1))


PEERS: dict[str, Callable] = {
    "default": ours_default,
    "triton": ours_triton,
    "triton_mm": ours_triton_matmul,
    "triton_fused": ours_triton_fused,
    "torch": ours_torch,
    "torch_recompute": ours_torch_recompute,
    "naive": naive,
    "compile": compiled,
    "cce": cce,
    "cce_filter": cce_filter,
    "liger": liger,
}
# pip distribution (for messages) and import name of the optional peers
_CCE = ("cut-cross-entropy", "cut_cross_entropy")
_OPTIONAL = {"cce": _CCE, "cce_filter": _CCE, "liger": ("liger-kernel", "liger_kernel")}
_ENTRY = {"cce": "cut_cross_entropy", "cce_filter": "cut_cross_entropy",
          "liger": "liger_kernel.transformers.functional"}  # what the peers import
# Matmul units of 2*N_counted*D*V each path does, (forward, backward) with a trainable / frozen head. "all": the
# units run over every position, ignored ones included (x N_total / N_counted). None: not stated for that peer.
PATH_UNITS = {
    "triton": {True: (1, 3), False: (1, 2)},  # the backward recomputes the logits
    "triton_mm": {True: (1, 3), False: (1, 2)},
    "torch_recompute": {True: (1, 3), False: (1, 2)},
    "triton_fused": {True: (3, 0), False: (2, 0)},  # gradients formed in the forward; backward only scales
    "torch": {True: (3, 0), False: (2, 0)},
    "naive": {True: ("all", 1, 2), False: ("all", 1, 1)},
    "compile": {True: ("all", 1, 2), False: ("all", 1, 1)},
}
# peers whose gradients are approximate by design: their error against the reference is recorded, not asserted
APPROXIMATE = frozenset({"cce_filter"})


def unavailable(name: str, device) -> str | None:
    """Why peer ``name`` cannot run on ``device`` (a skip reason), or None when it can."""
    device = torch.device(device)
    if name not in PEERS:
        return f"unknown peer {name!r}"
    if name in _OPTIONAL:
        dist, mod = _OPTIONAL[name]
        if device.type != "cuda" and not (name == "liger" and _device.interpreting()):
            # Liger's kernels also run (slowly) in Triton's CPU interpreter; CCE's fail there
            return f"{dist} runs its Triton kernels on CUDA only" + ("" if name == "liger" else
                                                                       " (they fail under TRITON_INTERPRET)")
        if importlib.util.find_spec(mod) is None:
            return f"{dist} is not installed (GPU machine: carry it as a wheel, see benchmarks/gpu_wheels.sh)"
        try:
            importlib.import_module(_ENTRY[name])
        except Exception as e:  # a wheel built for other torch/triton versions: skip with the reason, never crash
            return f"{dist} is installed but does not import here: {type(e).__name__}: {e}"
    if name in ("triton", "triton_mm", "triton_fused"):
        probe = torch.empty(0, device=device)
        if not _device.triton_can_run(probe):
            return "triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)"
    return None


# --------------------------------------------------------------------------------------------- verification
def _rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def verify(name: str, hidden, weight, labels, head_trainable: bool) -> tuple[str | None, dict]:
    """Check peer ``name``'s loss and gradients against ``impl="reference"``.

    Returns (an error message or None when they agree, the relative errors).

    Tolerances: relative (norm) error of the gradients and of the loss, 1e-3 in float32 and 3e-2 in bf16/fp16
    (the reference rounds logits to the input dtype, the fused paths accumulate in float32).
    """
    tol = 1e-3 if hidden.dtype == torch.float32 else 3e-2
    results = []
    for fn in (PEERS[name], reference):
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(head_trainable)
        loss = fn(h, w, labels, head_trainable)
        loss.backward()
        results.append((loss.detach().float(), h.grad, w.grad))
        del loss, h, w
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = results
    if not bool(torch.isfinite(loss)):
        return f"{name}: non-finite loss {loss.item()}", {}
    errs = {
        "loss": float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1.0)),
        "grad_hidden": _rel_err(gh, ref_gh),
        "grad_weight": _rel_err(gw, ref_gw),
    }
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        return f"{name} disagrees with impl='reference' (relative errors {bad}, tolerance {tol})", errs
    return None, errs
