"""The training policy on 1..N processes: wrap a Hugging Face causal LM for a strategy (one process, DDP, FSDP2),
and the few things that differ between strategies (gradient sync, resharding, gradient norm, unwrapping).

The unit of training is :class:`tspin_kernels.integrations.CausalLMLogps`: its ``forward`` runs the backbone and
the fused log-prob kernel, so wrapping *it* makes DDP sync every gradient and lets FSDP2 gather the LM-head weight
around the kernel::

    policy = wrap_model(model, "fsdp2", info=init_distributed())   # or "ddp" / "none"
    logps = policy(input_ids, labels, attention_mask=...)          # (rows,) float32, rows [real; generated; proto]
    policy_of(policy).model                                        # the Hugging Face model (PEFT kept)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from tspin_kernels.integrations import CausalLMLogps, backbone_and_head

from .choices import STRATEGIES
from .ranks import DistInfo, dist_info


def policy_of(model: nn.Module) -> CausalLMLogps:
    """The :class:`CausalLMLogps` inside a wrapped model: the one way the trainer unwraps.

    DDP is the only wrapper that is an object of its own (``.module``); FSDP2 shards the policy in place. The
    Hugging Face model, PEFT wrapper kept, is ``policy_of(model).model``.
    """
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not isinstance(inner, CausalLMLogps):
        raise TypeError(f"model: expected the training policy (the result of wrap_model / load_policy), "
                        f"got {type(model).__name__}")
    return inner


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return isinstance(module, FSDPModule)


def tied_head(model: nn.Module) -> bool:
    """Whether the policy's LM head shares its weight with the input embeddings (then stored once on disk)."""
    return bool(getattr(policy_of(model).model.config, "tie_word_embeddings", False))


def _decoder_layers(decoder: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, by the model's own ``_no_split_modules`` (the HF sharding unit)."""
    names = set(getattr(decoder, "_no_split_modules", None) or ())
    layers = [m for m in decoder.modules() if type(m).__name__ in names]
    if not layers:
        found = getattr(decoder, "layers", None)
        layers = list(found) if isinstance(found, nn.ModuleList) else []
    if not layers:
        raise TypeError(f"model: cannot find the decoder blocks of {type(decoder).__name__} to shard")
    return layers


def wrap_model(model: nn.Module, strategy: str = "fsdp2", *, info: DistInfo | None = None,
               param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32,
               reshard_after_forward: bool = True, find_unused_parameters: bool = False,
               impl: str = "auto") -> nn.Module:
    """Wrap a Hugging Face causal LM (or a :class:`CausalLMLogps`) for training on this process group.

    Call it as ``wrapped(input_ids, labels, attention_mask=None, position_ids=None, cu_seqlens=None)`` for
    per-sequence log-probs; generate with ``policy_of(wrapped).generate(...)``.

    - ``"none"``: the :class:`CausalLMLogps`, moved to this rank's device.
    - ``"ddp"``: ``DistributedDataParallel`` around it; gradients are all-reduced (averaged) in backward.
    - ``"fsdp2"``: ``fully_shard`` on every decoder block, on the final norm + LM head as one unit (the head's forward
      is the fused kernel, so the full weight is gathered around it and its gradient reduce-scattered), then on
      the root (embeddings and whatever is left). A head tied to the input embeddings stays with the root. Mixed
      precision via ``param_dtype`` (e.g. ``torch.bfloat16``) with ``reduce_dtype`` gradients. ``generate`` is
      registered as a forward method and runs with ``synced_gpus`` (ranks finish at different steps).

    The model must be on CPU or this rank's device, with identical weights on every rank (load the same checkpoint,
    or seed identically before random init).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    info = info or dist_info()
    policy = model if isinstance(model, CausalLMLogps) else CausalLMLogps(model, impl=impl)
    if strategy != "none" and not info.distributed:
        raise ValueError(f"strategy: {strategy!r} needs a process group; call init_distributed() under torchrun first")
    if strategy != "fsdp2":  # fully_shard moves one unit at a time: never the whole model on one GPU
        policy.to(info.device)
    if strategy == "none":
        return policy
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            policy, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None)
    kw = dict(mesh=mesh, mp_policy=mp)
    decoder, head = backbone_and_head(policy.model)
    for layer in _decoder_layers(decoder):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    if decoder.get_input_embeddings().weight is not head.weight:  # a tied head stays with the root
        norm = getattr(decoder, "norm", None)
        unit = [norm, head] if isinstance(norm, nn.Module) and any(True for _ in norm.parameters()) else head
        # The head runs last in forward and first in backward: keeping it gathered saves one all-gather.
        fully_shard(unit, reshard_after_forward=False, **kw)
    fully_shard(policy, **kw)
    register_fsdp_forward_method(policy, "generate")
    policy.synced_generation = info.world_size > 1
    return policy


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient accumulation: ``with grad_sync(wrapped, enabled=is_last_micro_batch):`` around forward+backward.

    Non-final micro-batches skip the all-reduce (DDP ``no_sync``) / reduce-scatter (FSDP2) and accumulate locally;
    the final one communicates the sum. Results are the same either way; this only saves communication.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with contextlib.nullcontext() if enabled else model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def reshard(model: nn.Module) -> nn.Module:
    """Put every FSDP2 unit back in its sharded state (a no-op otherwise). Needed before building an optimizer or
    loading a checkpoint: after a forward outside training (``generate``, no-grad log-probs) the root unit keeps
    its parameters unsharded, and ``model.parameters()`` would hand out the temporary full tensors."""
    if is_fsdp(model):
        for m in model.modules():
            if is_fsdp(m):
                m.reshard()
    return model


def clip_grad_norm(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Global gradient norm over every rank's shards (clipped to ``max_norm`` unless None), as a 0-d tensor on the
    model's device: nothing is read back to the host.

    Works for plain, DDP and FSDP2 models (FSDP2 gradients are DTensors: the norm is reduced across ranks).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=next(model.parameters()).device)
    norm = torch.nn.utils.clip_grad_norm_(params, float("inf") if max_norm is None else max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
