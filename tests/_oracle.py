"""Shared helpers for the kernel tests: random inputs and the float64 oracle."""

from __future__ import annotations

import torch

from tspin_kernels.reference import naive_sequence_logps


def make_inputs(R, T, D, V, dtype, *, ignore_frac=0.4, bias=False, packed=False, seed=0, empty_row=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, T, D, generator=g) * 2.0
    weight = torch.randn(V, D, generator=g) / D**0.5
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, V, (R, T), generator=g)
    labels[torch.rand(R, T, generator=g) < ignore_frac] = -100
    labels[:, : max(1, T // 3)] = -100  # a prompt prefix
    if empty_row is not None:
        labels[empty_row] = -100
    out = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), labels=labels, bias=None if b is None else b.to(dtype))
    if packed:  # rows of different lengths packed back to back
        lens = [T - (i * 3) % max(T - 1, 1) for i in range(R)]
        out["hidden"] = torch.cat([out["hidden"][i, : lens[i]] for i in range(R)])
        out["labels"] = torch.cat([labels[i, : lens[i]] for i in range(R)])
        out["cu_seqlens"] = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    return out


def run(inputs, impl, *, dtype=None, grads=("hidden", "weight", "bias"), weight_grad=True, weights=None,
        device="cpu", **opts):
    """Forward + backward of sum(out * weights); returns (out, {name: grad}) in float64 on the CPU."""
    t = {k: (v.to(dtype) if dtype is not None and v is not None and v.is_floating_point() else v)
         for k, v in inputs.items()}
    t = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    t = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    t["hidden"].requires_grad_(True)
    t["weight"].requires_grad_(weight_grad)
    if t.get("bias") is not None:
        t["bias"].requires_grad_(True)
    fn = naive_sequence_logps if impl == "naive" else None
    kw = dict(bias=t.get("bias"), cu_seqlens=t.get("cu_seqlens"), **opts)
    if fn is None:
        from tspin_kernels import sequence_logps

        out = sequence_logps(t["hidden"], t["weight"], t["labels"], impl=impl, **kw)
    else:
        out = fn(t["hidden"], t["weight"], t["labels"], **kw)
    w = weights if weights is not None else torch.linspace(-1.0, 2.0, out.numel())
    (out * w.to(out)).sum().backward()
    gr = {}
    for name in grads:
        x = t.get(name)
        if x is not None and x.grad is not None:
            gr[name] = x.grad.double().cpu()
    return out.detach().double().cpu(), gr


def spy(monkeypatch, module, name: str, record) -> None:
    """Replace ``module.name`` by a wrapper that calls ``record(*args, **kwargs)`` and then the real function."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: record(*a, **k) or real(*a, **k))
