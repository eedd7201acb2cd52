"""Build the policy a run trains: read the tokenizer and the checkpoint (rank 0 alone under torchrun), add LoRA
adapters and gradient checkpointing, wrap for the strategy (:mod:`tspin.wrapping`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from tspin_kernels.integrations import VARLEN_SDPA, CausalLMLogps, backbone_and_head, packing_attn_implementation

from .ranks import DistInfo, dist_info, init_distributed
from .wrapping import STRATEGIES, wrap_model

# A Hub id: "name" or "owner/name" (anything else can only be a local path)
_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")


def check_source(key: str, value: str, weights: bool = False) -> None:
    """A model or tokenizer given by a path that can only be local (absolute, ./, ../, ~, nested) must be a
    directory: say so naming the key, before transformers turns it into a Hub lookup. ``weights``: a local model
    directory must hold its weights as safetensors (:func:`check_safetensors`)."""
    if not value:
        raise ValueError(f"config: {key} is required")
    p = Path(value).expanduser()
    if p.is_file():
        raise ValueError(f"config: {key}={value!r}: expected a model directory (save_pretrained) or a Hub id, "
                         "got a file")
    if not p.exists() and (not _HUB_ID.fullmatch(value) or value.startswith(".")):
        raise FileNotFoundError(f"config: {key}={value!r}: no such directory")
    if weights and p.is_dir():
        check_safetensors(f"config: {key}={value!r}", p)


# weight files that are pickles: loading one can run code it names, so tspin never does
_PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_safetensors(label: str, path: Path) -> None:
    """A model directory whose weights are pickles only (pytorch_model.bin, ...) is refused, with how to convert it;
    one with no weights at all is left to transformers' own message."""
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(f.name for pattern in _PICKLED_WEIGHTS for f in path.glob(pattern))
    if pickled:
        raise ValueError(f"{label}: its weights are {', '.join(pickled[:3])}, a pickle, and no *.safetensors; tspin "
                         "loads weights only from safetensors (loading a pickle can run code from the file). Convert "
                         "them once, where you trust the file: AutoModelForCausalLM.from_pretrained(path)"
                         ".save_pretrained(path)")


def _from_pretrained(load, path, what: str):
    """transformers' loading errors (missing files, no network for a Hub id, unknown architecture, a weight file
    cut short) as one ValueError naming the path."""
    from safetensors import SafetensorError

    try:
        return load(str(path))
    except (OSError, ValueError, SafetensorError) as e:
        cut = " (a safetensors file there is damaged or cut short)" if isinstance(e, SafetensorError) else ""
        raise ValueError(f"{path}: could not load the {what}{cut}: {e}") from e


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer")
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path}: needs a pad or an eos token")
        tok.pad_token = tok.eos_token
    return tok


def resolve_device(name: str) -> torch.device:
    """The config's ``device`` ("auto", "cpu", "cuda", "cuda:N") for a one-process run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config: device={name!r} but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"config: device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


@dataclass(frozen=True)
class LoadSettings:
    """How the training policy is built: the checkpoint, how each process holds it (``strategy``, and ``device``
    for 'none'), LoRA (``lora_rank`` 0: full fine-tuning; ``lora_target_modules``: peft's 'all-linear' or module
    names), dropout off or kept, gradient checkpointing, bf16, and the attention (``attn_implementation``, 'auto'
    resolved for ``layout``, the layout of the rows it trains on: :func:`resolve_attn_implementation`)."""

    model_name_or_path: str
    strategy: str = "none"
    device: str = "auto"
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    disable_dropout: bool = True
    gradient_checkpointing: bool = False
    bf16: bool = True
    attn_implementation: str = "auto"
    layout: str = "padded"


def resolve_attn_implementation(name: str, layout: str, device: torch.device) -> str | None:
    """The attention the policy runs for rows laid out as ``layout`` on ``device``: ``name``, or for "auto" one
    whose cost is the sum of the sequences' attention where rows hold several sequences (a packed row behind
    sdpa's dense mask costs the square of the row: 3.0-4.5x padded's CPU seconds for a whole ``tspin train`` in
    benchmarks/results/cpu-20261204-train-layouts-mixes.json), and transformers' default (None: sdpa where the
    model has it) for padded rows.
    A choice that cannot train on ``device`` is refused here, before the model is read."""
    if name == "flex_attention" and device.type == "cpu":
        raise ValueError("config: attn_implementation='flex_attention': torch's FlexAttention has no backward on the "
                         "CPU; use varlen_sdpa (what auto picks there)")
    if name == "flash_attention_2" and (device.type != "cuda" or importlib.util.find_spec("flash_attn") is None):
        raise ValueError("config: attn_implementation='flash_attention_2' needs a CUDA device and the flash-attn "
                         "package (pip install 'tspin[flash]'); use varlen_sdpa (or auto)")
    if name != "auto":
        return name
    if layout == "packed":
        return packing_attn_implementation(device)  # flash_attention_2 where installed (CUDA), else varlen_sdpa
    return VARLEN_SDPA if layout == "shared_prefix" else None


def load_policy(settings: LoadSettings) -> nn.Module:
    """The policy every command trains and samples from: the HF model (+ LoRA adapters, + gradient checkpointing,
    both before wrapping) inside CausalLMLogps, wrapped for the settings' strategy. Its forward is the fused
    log-prob path, so DDP's all-reduce and FSDP2's unsharding cover the whole loss. fp32 master weights: bf16 comes
    from autocast (one process, DDP) or from FSDP2's own mixed precision."""
    s = settings
    check_source("model_name_or_path", s.model_name_or_path, weights=True)
    info = init_distributed()
    if s.strategy != "none" and not info.distributed:
        raise ValueError(f"config: strategy={s.strategy!r} needs a process group: launch with torchrun "
                         "--nproc_per_node N -m tspin.cli ... (or accelerate launch)")

    def prepare(model):
        if s.lora_rank:
            targets = s.lora_target_modules
            model = apply_lora(model, r=s.lora_rank, alpha=s.lora_alpha,
                               target_modules=targets if isinstance(targets, str) else list(targets))
        if s.disable_dropout:
            disable_dropout(model)
        if s.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    if s.strategy == "none":  # one copy per process, on the settings' device
        info = dataclasses.replace(info, device=resolve_device(s.device))
    attn = resolve_attn_implementation(s.attn_implementation, s.layout, info.device)
    bf16 = torch.bfloat16 if s.strategy == "fsdp2" and info.device.type == "cuda" and s.bf16 else None
    return load_for_training(s.model_name_or_path, s.strategy, info=info, param_dtype=bf16, prepare=prepare,
                             attn_implementation=attn)


def load_for_training(path: str | Path, strategy: str = "fsdp2", *, info: DistInfo | None = None,
                      dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
                      prepare: Callable[[nn.Module], nn.Module] | None = None, **wrap_kwargs) -> nn.Module:
    """``from_pretrained`` + :func:`~tspin.wrapping.wrap_model` where only rank 0 reads the checkpoint into memory.

    The other ranks build the model on the meta device (no memory); after wrapping, rank 0's weights and buffers
    are broadcast (FSDP2: and sharded). Host memory is one copy per node instead of one per rank (8 x 28 GB for
    a 7B model in fp32). ``prepare(model) -> model`` runs on every rank before wrapping, e.g. :func:`apply_lora`
    (rank 0's adapter init is the one broadcast) or :func:`enable_gradient_checkpointing`. ``attn_implementation``:
    transformers' ``attn_implementation`` (None: its default), e.g. ``"varlen_sdpa"`` for packed rows.
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
        # safetensors only: a pytorch_model.bin is a pickle, and loading one can run code from the file
        model = _from_pretrained(lambda p: AutoModelForCausalLM.from_pretrained(p, use_safetensors=True, **kw),
                                 path, "model")
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(_from_pretrained(AutoConfig.from_pretrained, path, "model"),
                                                     **kw)
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


def _retie(policy: CausalLMLogps) -> None:
    """to_empty replaces each module's parameter separately, which unties a head tied to the input embeddings:
    rank 0 would then hold one parameter fewer than the others (DDP refuses to start)."""
    lm = policy.model
    if getattr(lm.config, "tie_word_embeddings", False) and hasattr(lm, "tie_weights"):
        lm.tie_weights()


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
    head_names = {n for n, m in model.named_modules() if m is head}
    if isinstance(target_modules, (list, tuple)) and any(n.split(".")[-1] in target_modules for n in head_names):
        raise ValueError(f"target_modules: the LM head ({sorted(head_names)}) must stay frozen and un-adapted")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     task_type="CAUSAL_LM", bias="none")
    peft_model = get_peft_model(model, cfg)
    if head.weight.requires_grad:  # peft freezes the base; this guards against future defaults
        head.weight.requires_grad_(False)
    return peft_model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of `model` off, in the modules only (the saved config keeps its rates): ``nn.Dropout``
    modules (what TRL's ``disable_dropout_in_model`` covers) and the float rates attention modules read in forward
    (Llama/Mistral's ``attention_dropout``, handed to sdpa while training). Returns the model."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder block in backward (non-reentrant, so it composes with FSDP2, DDP and frozen
    embeddings under LoRA). Call on the Hugging Face model (PEFT or not) before wrapping. Returns the model."""
    # transformers >= 5.2x renamed it (the old name warns); the GPU image's 5.17 has only the old one
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
