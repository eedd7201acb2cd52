"""Multi-process training: process group from torchrun / accelerate, DDP or FSDP2 wrapping, rank-sharded
generation, checkpoints loadable at any rank count, LoRA with a frozen head, gradient checkpointing.

The unit of training is :class:`tspin_kernels.integrations.CausalLMLogps`: its ``forward`` runs the backbone and
the fused log-prob kernel, so wrapping *it* makes DDP sync every gradient and lets FSDP2 gather the LM-head weight
around the kernel. Typical use::

    info = init_distributed()                               # torchrun / accelerate launch env, or one process
    model = AutoModelForCausalLM.from_pretrained(...)       # every rank loads the full HF checkpoint
    policy = wrap_model(model, "fsdp2", info=info)          # or "ddp" / "none"
    logps = policy(input_ids, labels, attention_mask=...)   # (rows,) float32, rows [real; generated; proto]
    loss = tspin_loss_from_logps(*logps.chunk(3)); loss.backward(); opt.step()
    texts = sharded_generate(prompts, lambda ps: my_generate(policy, ps), info=info)   # same list on every rank
    save_checkpoint(policy, out_dir, tokenizer=tok)         # HF directory, written by rank 0
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from tspin_kernels.integrations import CausalLMLogps, backbone_and_head, unwrap_causal_lm

STRATEGIES = ("none", "ddp", "fsdp2")

__all__ = [
    "DistInfo", "init_distributed", "cleanup_distributed", "dist_info", "wrap_model", "load_for_training",
    "policy_of", "hf_model_of", "clip_grad_norm",
    "sharded_generate", "full_state_dict", "save_checkpoint", "load_checkpoint", "full_optimizer_state_dict",
    "load_optimizer_state_dict", "grad_sync", "reshard", "apply_lora", "enable_gradient_checkpointing",
    "all_reduce_mean",
    "STRATEGIES",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer in the environment, got {value!r}") from None


def dist_info() -> DistInfo:
    """Where this process stands, whether or not a process group exists."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
    else:
        rank, world, backend = 0, 1, None
    local_rank = _env_int("LOCAL_RANK", rank)
    if torch.cuda.is_available() and backend != "gloo":
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device, backend)


def init_distributed(backend: str | None = None, *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by the launcher's environment (torchrun and ``accelerate launch`` both set
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    ``backend`` defaults to nccl with CUDA, gloo otherwise. Without a launcher (``WORLD_SIZE`` unset) this is one
    process and no group is created. Idempotent.
    """
    if backend is not None and backend not in ("nccl", "gloo"):
        raise ValueError(f"backend: expected 'nccl', 'gloo' or None, got {backend!r}")
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 and "MASTER_ADDR" not in os.environ:
        return dist_info()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend: 'nccl' needs CUDA; use 'gloo' on CPU")
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist_info()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor | float) -> float:
    """Mean of a scalar over ranks (for logging; the identity in one process)."""
    t = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(dist_info().device)
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return float(t)


# ---------------------------------------------------------------------------------------------------------------
# Wrapping
# ---------------------------------------------------------------------------------------------------------------


def policy_of(model: nn.Module) -> CausalLMLogps:
    """The :class:`CausalLMLogps` inside a wrapped model (DDP keeps it as ``.module``; FSDP2 modifies in place)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not isinstance(inner, CausalLMLogps):
        raise TypeError(f"model: expected the result of wrap_model (a CausalLMLogps), got {type(model).__name__}")
    return inner


def hf_model_of(model: nn.Module) -> nn.Module:
    """The Hugging Face model (PEFT wrapper kept) inside a wrapped or plain model."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.model if isinstance(model, CausalLMLogps) else model


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, by the model's own ``_no_split_modules`` (the HF sharding unit)."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        decoder, _ = backbone_and_head(lm)
        found = getattr(decoder, "layers", None)
        layers = list(found) if isinstance(found, nn.ModuleList) else []
    if not layers:
        raise TypeError(f"model: cannot find the decoder blocks of {type(lm).__name__} to shard")
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
    lm = unwrap_causal_lm(policy)
    for layer in _decoder_layers(lm):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    decoder, head = backbone_and_head(lm)
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    tied = emb is not None and emb.weight is head.weight
    if not tied:
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
    elif _is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def load_for_training(path: str | Path, strategy: str = "fsdp2", *, info: DistInfo | None = None,
                      dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
                      prepare: Callable[[nn.Module], nn.Module] | None = None, **wrap_kwargs) -> nn.Module:
    """``from_pretrained`` + :func:`wrap_model` where only rank 0 reads the checkpoint into CPU memory.

    The other ranks build the model on the meta device (no memory); after wrapping, rank 0's weights and buffers
    are broadcast (FSDP2: and sharded). Host memory is one copy per node instead of one per rank (8 x 28 GB for
    a 7B model in fp32). ``prepare(model) -> model`` runs on every rank before wrapping, e.g. :func:`apply_lora`
    (rank 0's adapter init is the one broadcast) or :func:`enable_gradient_checkpointing`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    info = info or dist_info()
    kw: dict = {"dtype": dtype}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    rank0_reads = strategy != "none" and info.distributed and info.world_size > 1
    if not rank0_reads or info.is_main:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), **kw)
    if prepare is not None:
        model = prepare(model)
    if not rank0_reads:
        return wrap_model(model, strategy, info=info, **wrap_kwargs)
    policy = model if isinstance(model, CausalLMLogps) else CausalLMLogps(model, impl=wrap_kwargs.pop("impl", "auto"))
    if strategy == "ddp":  # DDP broadcasts rank 0's parameters and buffers when it is built
        if not info.is_main:
            policy.to_empty(device=info.device)
            _retie(policy)
        return wrap_model(policy, "ddp", info=info, **wrap_kwargs)
    # Keep rank 0's values (the detached tensors still point at the CPU storage fully_shard moves away from).
    full = {k: v.detach() for k, v in policy.state_dict().items()} if info.is_main else {}
    buffers = {k: v.detach().clone() for k, v in policy.named_buffers()} if info.is_main else {}
    wrapped = wrap_model(policy, "fsdp2", info=info, **wrap_kwargs)
    wrapped.to_empty(device=info.device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(wrapped, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():  # non-persistent buffers (rotary inv_freq) are in no state dict: broadcast them all
        for name, buf in sorted(wrapped.named_buffers()):
            if info.is_main:
                buf.copy_(buffers[name])
            dist.broadcast(buf, src=0)
    return wrapped


def reshard(model: nn.Module) -> nn.Module:
    """Put every FSDP2 unit back in its sharded state (a no-op otherwise). Needed before building an optimizer:
    after a forward outside training (``generate``, no-grad log-probs) the root unit keeps its parameters
    unsharded, and ``model.parameters()`` would hand the optimizer the temporary full tensors."""
    if _is_fsdp(model):
        for m in model.modules():
            if _is_fsdp(m):
                m.reshard()
    return model


def _retie(policy: nn.Module) -> None:
    """to_empty replaces each module's parameter separately, which unties a head tied to the input embeddings:
    rank 0 would then hold one parameter fewer than the others (DDP refuses to start)."""
    lm = unwrap_causal_lm(policy)
    if getattr(getattr(lm, "config", None), "tie_word_embeddings", False) and hasattr(lm, "tie_weights"):
        lm.tie_weights()


def clip_grad_norm(model: nn.Module, max_norm: float | None) -> float:
    """Global gradient norm over every rank's shards (clipped to ``max_norm`` unless None), as a float.

    Works for plain, DDP and FSDP2 models (FSDP2 gradients are DTensors: the norm is reduced across ranks).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, float("inf") if max_norm is None else max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ---------------------------------------------------------------------------------------------------------------
# Generation sharded over ranks
# ---------------------------------------------------------------------------------------------------------------


def sharded_generate(items: Sequence, generate_fn: Callable[[list], Sequence], *, info: DistInfo | None = None) -> list:
    """Run ``generate_fn`` on this rank's share of ``items`` and return every rank's results in ``items`` order.

    Item i goes to rank ``i % world_size``. Every rank gets the same number of items (the short ones repeat their
    last item, and the repeats' results are dropped) because under FSDP2 each forward is a collective: ranks must
    make the same number of ``generate`` calls. ``generate_fn(list_of_items) -> list_of_results`` (same length)
    must be called on every rank; results must be picklable. Returns the full list on every rank.
    """
    if not callable(generate_fn):
        raise TypeError(f"generate_fn: expected a callable taking a list of items, got {type(generate_fn).__name__}")
    items = list(items)
    info = info or dist_info()
    if not info.distributed or info.world_size == 1:
        out = list(generate_fn(items)) if items else []
        if len(out) != len(items):
            raise ValueError(f"generate_fn: returned {len(out)} results for {len(items)} items")
        return out
    world, rank = info.world_size, info.rank
    if not items:
        return []
    mine = list(range(rank, len(items), world))
    per_rank = math.ceil(len(items) / world)
    filler = mine[-1] if mine else 0
    local = [items[i] for i in mine] + [items[filler]] * (per_rank - len(mine))
    out = list(generate_fn(local))
    if len(out) != len(local):
        raise ValueError(f"generate_fn: returned {len(out)} results for {len(local)} items on rank {rank}")
    gathered: list = [None] * world
    dist.all_gather_object(gathered, out[: len(mine)])
    result: list = [None] * len(items)
    for r, outs in enumerate(gathered):
        for j, value in enumerate(outs):
            result[r + j * world] = value
    return result


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------

_PREFIX = "model."  # CausalLMLogps keeps the Hugging Face model as .model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Hugging Face model's full (unsharded) state dict on CPU, keyed as ``hf_model.state_dict()``.

    A collective under FSDP2 (call it on every rank); the dict is complete on rank 0 and empty elsewhere.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    target = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    info = dist_info()
    sharded = isinstance(target, CausalLMLogps) and _is_fsdp(target)
    if sharded:
        sd = get_model_state_dict(target, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif info.is_main:
        sd = {k: v.detach().cpu() for k, v in target.state_dict().items()}
    else:
        sd = {}
    if isinstance(target, CausalLMLogps):
        sd = {k[len(_PREFIX):]: v for k, v in sd.items() if k.startswith(_PREFIX)}
    return sd


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return isinstance(module, FSDPModule)


def save_checkpoint(model: nn.Module, out_dir: str | Path, *, tokenizer=None) -> Path:
    """Save a Hugging Face directory (``save_pretrained``) that loads at any rank count.

    Full weights are gathered to rank 0 (a collective: call on every rank), so the directory is the usual unsharded
    checkpoint: ``from_pretrained`` on each rank of any later run, then :func:`wrap_model`. A PEFT model saves its
    adapter (load it with ``PeftModel.from_pretrained(base, out_dir)``).
    """
    out = Path(out_dir)
    sd = full_state_dict(model)
    info = dist_info()
    if info.is_main:
        hf = hf_model_of(model)
        out.mkdir(parents=True, exist_ok=True)
        if hasattr(hf, "peft_config"):
            hf.save_pretrained(str(out), state_dict=sd)
        else:
            unwrap_causal_lm(hf).save_pretrained(str(out), state_dict=sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    if info.distributed:
        dist.barrier()
    return out


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"path: no model*.safetensors in {path} (expected a save_checkpoint directory)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a full-model :func:`save_checkpoint` directory into an already wrapped model, at any rank count.

    Rank 0 reads the files and the weights are broadcast and re-sharded for this run's layout (a collective).
    For a fresh run, ``from_pretrained(path)`` on every rank before :func:`wrap_model` does the same.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = Path(path)
    target = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    policy = policy_of(target)
    if hasattr(policy.model, "peft_config"):
        raise TypeError("model: load_checkpoint restores full models; load a PEFT adapter with "
                        "PeftModel.from_pretrained")
    info = dist_info()
    sd: dict[str, torch.Tensor] = {}
    if info.is_main:
        sd = {_PREFIX + k: v for k, v in _read_hf_weights(path).items()}
        # Tied parameters appear once in the file; the module exposes every name.
        names: dict[int, list[str]] = {}
        for name, p in policy.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        for group in names.values():
            present = [n for n in group if n in sd]
            for n in group:
                if n not in sd and present:
                    sd[n] = sd[present[0]]
        expected = set(policy.state_dict().keys())
        missing = sorted(expected - set(sd))
        if missing:
            raise KeyError(f"path: checkpoint {path} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        sd = {k: v for k, v in sd.items() if k in expected}
    if info.distributed and (_is_fsdp(policy) or info.world_size > 1):
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(policy, sd, options=opts)
    else:
        policy.load_state_dict(sd)


def _optim_target(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names, unsharded, on CPU: loadable at any rank count with
    :func:`load_optimizer_state_dict`. A collective under FSDP2; complete on rank 0 (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    target = _optim_target(model)
    if _is_fsdp(target):
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(target, optimizer, options=opts)
    return get_optimizer_state_dict(target, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a :func:`full_optimizer_state_dict` (saved at any rank count) into this run's optimizer.

    Under a process group only rank 0 needs ``state`` (others may pass ``{}``): it is broadcast and re-sharded.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not isinstance(state, dict):
        raise TypeError(f"state: expected the dict from full_optimizer_state_dict, got {type(state).__name__}")
    info = dist_info()
    broadcast = info.distributed and info.world_size > 1
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
    set_optimizer_state_dict(_optim_target(model), optimizer, state, options=opts)


# ---------------------------------------------------------------------------------------------------------------
# Scale down: LoRA, gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, *, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear"):
    """Wrap a Hugging Face causal LM with peft LoRA adapters; every base weight, the LM head included, is frozen.

    ``"all-linear"`` targets every linear layer except the output head. With the head frozen the kernel does no
    ``grad_weight`` work. Returns the ``PeftModel``.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r: expected a positive int rank, got {r!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    _, head = backbone_and_head(model)
    head_names = {n for n, m in unwrap_causal_lm(model).named_modules() if m is head}
    if isinstance(target_modules, (list, tuple)) and any(n.split(".")[-1] in target_modules for n in head_names):
        raise ValueError(f"target_modules: the LM head ({sorted(head_names)}) must stay frozen and un-adapted")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     task_type="CAUSAL_LM", bias="none")
    peft_model = get_peft_model(model, cfg)
    if head.weight.requires_grad:  # peft freezes the base; this guards against future defaults
        head.weight.requires_grad_(False)
    return peft_model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder block in backward (non-reentrant, so it composes with FSDP2, DDP and frozen
    embeddings under LoRA). Call before :func:`wrap_model`. Returns the model."""
    target = hf_model_of(model)
    # transformers >= 5.2x renamed it (the old name warns); the GPU image's 5.17 has only the old one
    if hasattr(target, "activation_checkpointing_enable"):
        target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
