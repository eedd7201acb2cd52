"""Hugging Face causal LMs -> per-sequence log-probs through the fused kernel, padded or packed, on 1..N ranks.

The backbone runs for the last hidden states; the LM head is never applied to the whole sequence. The head's
weight (and bias) go to :func:`tspin_kernels.sequence_logps` instead.

Under FSDP2 the head weight is a sharded DTensor outside its unit's forward. The fused log-probs therefore run
*inside* the head's ``forward``: :func:`install_fused_head` gives the head module (an ``nn.Linear``) a forward that
takes ``labels=``; without them it is the plain linear layer, so ``generate`` and ``model(...)`` are unchanged.
FSDP's hooks around that forward all-gather the weight and reduce-scatter its gradient, exactly as for any
layer. :class:`CausalLMLogps` is the module to wrap with DDP / ``fully_shard``: its ``forward`` is the whole path.

Packed, padding-free batches are one row of concatenated sequences with ``position_ids`` restarting at 0 per
sequence and no attention mask. transformers (>= 4.53, 5.x) detects that layout from ``position_ids``: sdpa/eager/flex
get a block-diagonal causal mask over the whole row (work and memory grow with the square of the row),
``flash_attention_2`` the varlen kernel, and ``varlen_sdpa`` (ours, :mod:`.varlen_sdpa`) one sdpa per bucket of
equal sequences. That detection is skipped when a KV cache exists, hence ``use_cache=False`` on every backbone call
here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .._inputs import check_cu_seqlens_layout, cu_seqlens_checks, raise_first
from .._options import check_flag, check_impl, check_options
from ..functional import sequence_logps
from ..positions import CountedPositions
from .attention_segments import VARLEN_SDPA, AttentionSegments
from .loss_spec import LossSpec
from .packing import packed_position_ids

__all__ = [
    "CausalLMLogps", "causal_lm_sequence_logps", "unwrap_causal_lm", "attention_implementation", "backbone_and_head",
    "install_fused_head",
]


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The underlying ``*ForCausalLM`` through DDP, torch.compile, :class:`CausalLMLogps` and PEFT wrappers.

    FSDP2 modifies modules in place, so a ``fully_shard``-ed model needs no unwrapping. For a PEFT model this is
    the base model with the adapters injected (calling it runs the adapters).
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, CausalLMLogps):
            model = model.model
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP / DataParallel
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
    return model


def attention_implementation(model) -> str:
    """The attention implementation ``model`` runs (``config._attn_implementation``), through any wrapper."""
    config = getattr(unwrap_causal_lm(model), "config", None)
    name = getattr(config, "_attn_implementation", None) if config is not None else None
    if name is None:
        raise TypeError(f"model: expected a Hugging Face causal LM (with config._attn_implementation), got "
                        f"{type(model).__name__}")
    return name


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder, lm_head)`` of a causal LM; raises for heads that are not a plain linear layer on the logits."""
    lm = unwrap_causal_lm(model)
    cfg = getattr(lm, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):  # these transform the logits after the head
        value = getattr(cfg, attr, None) if cfg is not None else None
        if value not in (None, 1.0):
            raise NotImplementedError(
                f"model: {type(lm).__name__} has {attr}={value}; the fused log-prob path supports a plain linear "
                "LM head only"
            )
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", None)
    if decoder is None or decoder is lm:  # transformers 4.x: get_decoder only where the backbone is `.model`
        decoder = getattr(lm, "base_model", None)
    if head is None or decoder is None or decoder is lm or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(
            f"model: expected a Hugging Face causal LM with a decoder backbone and a linear output embedding, "
            f"got {type(lm).__name__}"
        )
    return decoder, head


# ---------------------------------------------------------------------------------------------------------------
# The head's fused forward
# ---------------------------------------------------------------------------------------------------------------


def _head_logps(hidden, weight, bias, labels, loss: LossSpec | None = None, **options):
    if weight.dtype != hidden.dtype:  # autocast / mixed precision hand back hidden states in the compute dtype
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    if loss is not None:
        if not isinstance(loss, LossSpec):
            raise TypeError(f"loss: expected a tspin_kernels.integrations.LossSpec or None, got "
                            f"{type(loss).__name__}")
        return loss(hidden, weight, labels, bias=bias, **options)
    return sequence_logps(hidden, weight, labels, bias=bias, **options)


class _FusedLogpsHead:
    """Mixin placed before ``nn.Linear`` in the head's class: ``forward(h, labels=...)`` returns log-probs, or
    with ``loss=`` (a :class:`LossSpec`) the loss computed from them."""

    def forward(self, input, labels=None, *, loss: LossSpec | None = None, shift: bool = True, **options):
        """``options``: the keyword options of :func:`tspin_kernels.sequence_logps` (cu_seqlens, impl, ...)."""
        if labels is None:
            if loss is not None:
                raise ValueError("loss: the head computes a loss only together with labels")
            return super().forward(input)
        return _head_logps(input, self.weight, self.bias, labels, loss=loss, shift=shift, **options)


_FUSED_CLASSES: dict[type, type] = {}


def install_fused_head(model: nn.Module) -> nn.Module:
    """Give the LM head a ``forward(hidden, labels=..., ...)`` that returns fused per-sequence log-probs.

    The module keeps its parameters, state-dict keys and plain ``forward(hidden)`` (so ``generate`` and
    ``save_pretrained`` see no difference); only its class gains the ``labels=`` branch, the same class swap that
    FSDP2 itself uses. Idempotent. Returns the head.
    """
    _, head = backbone_and_head(model)
    if isinstance(head, _FusedLogpsHead):
        return head
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"model: the fused head needs the output embedding to be an nn.Linear, got {type(head).__name__} "
            "(is the LM head wrapped by an adapter? keep it out of LoRA target_modules / modules_to_save)"
        )
    cls = type(head)
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"FusedLogps{cls.__name__}", (_FusedLogpsHead, cls), {})
    head.__class__ = _FUSED_CLASSES[cls]
    return head


# ---------------------------------------------------------------------------------------------------------------
# Model-facing entry points
# ---------------------------------------------------------------------------------------------------------------


def _check_positions_inputs(input_ids, labels, attention_mask, position_ids, cu_seqlens) -> None:
    """Counted positions (a custom layout such as the shared-prefix one): ``(R, T)`` rows, the layout's own
    attention mask (4D tensor or FlexAttention BlockMask) and position ids; their values are the layout's."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids: expected an integer torch.Tensor, got {got}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: with counted positions expected (R, T) rows, got {tuple(input_ids.shape)}")
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens: counted positions address hidden rows directly; pass cu_seqlens=None")
    if isinstance(attention_mask, AttentionSegments):
        _check_segments(attention_mask, input_ids.numel())
    elif attention_mask is not None and len(getattr(attention_mask, "shape", ())) != 4:
        raise ValueError(
            "attention_mask: with counted positions expected the layout's 4D mask (R, 1, T, T), a FlexAttention "
            f"BlockMask or AttentionSegments, got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    if position_ids is not None and (not isinstance(position_ids, torch.Tensor)
                                     or tuple(position_ids.shape) != tuple(input_ids.shape)):
        got = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids: expected the shape of input_ids {tuple(input_ids.shape)}, got {got}")


def _check_segments(segments: AttentionSegments, tokens: int) -> None:
    if segments.tokens != tokens:
        raise ValueError(f"attention_mask: the AttentionSegments cover {segments.tokens} tokens, input_ids holds "
                         f"{tokens}")


def _check_model_inputs(input_ids, labels, attention_mask, position_ids, cu_seqlens, validate: bool):
    """Types and shapes always (free); with ``validate`` also the values: no padding in a packed row,
    ``cu_seqlens`` offsets (one host sync for both) and positions restarting per sequence (one more)."""
    if isinstance(labels, CountedPositions):
        return _check_positions_inputs(input_ids, labels, attention_mask, position_ids, cu_seqlens)
    for name, t in (("input_ids", input_ids), ("labels", labels)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name}: expected an integer torch.Tensor, got {got}")
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels: expected the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    segments = attention_mask if isinstance(attention_mask, AttentionSegments) else None
    if segments is not None:
        if cu_seqlens is None:
            raise ValueError("attention_mask: AttentionSegments describe a packed row; pass its cu_seqlens too")
        _check_segments(segments, input_ids.numel())
        attention_mask = None
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, AttentionSegments or None, got {type(t).__name__}")
    if cu_seqlens is None:
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids: expected (R, T) rows (or a packed (1, N) / (N,) row with cu_seqlens), "
                f"got {tuple(input_ids.shape)}"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        return
    if input_ids.dim() == 2 and input_ids.shape[0] != 1 or input_ids.dim() not in (1, 2):
        raise ValueError(
            f"input_ids: with cu_seqlens expected one packed row (1, N) or (N,), got {tuple(input_ids.shape)}"
        )
    check_cu_seqlens_layout(cu_seqlens, None)
    n = input_ids.shape[-1]
    if position_ids is not None and position_ids.numel() != n:
        raise ValueError(f"position_ids: expected {n} positions like input_ids, got {tuple(position_ids.shape)}")
    if not validate:
        return
    # checked before the backbone runs: positions are derived from cu_seqlens
    checks = cu_seqlens_checks(cu_seqlens, n)
    if attention_mask is not None:
        checks.append((~attention_mask.bool().all(), lambda: ValueError(
            "attention_mask: packed batches carry no padding; pass attention_mask=None with cu_seqlens")))
    raise_first(checks)
    if position_ids is not None:
        expected = packed_position_ids(cu_seqlens.to(position_ids.device), total=n)
        if not torch.equal(position_ids.reshape(-1).long(), expected):
            raise ValueError(
                "position_ids: a packed row needs positions restarting at 0 at every cu_seqlens offset "
                "(otherwise attention crosses sequence boundaries); pass position_ids=None to derive them"
            )


def causal_lm_sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                             attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                             cu_seqlens: torch.Tensor | None = None, shift: bool = True, average: bool = False,
                             ignore_index: int = -100, impl: str = "auto", backward: str | None = None,
                             grad_filter_eps: float | None = None, tiles: dict | None = None,
                             chunk_elements: int | None = None, validate: bool = True,
                             loss: LossSpec | None = None):
    """Per-sequence sum (or mean) of label-token log-probs of a Hugging Face causal LM, float32 ``(S,)``; with
    ``loss=`` (a :class:`LossSpec`) the T-SPIN / SPIN loss's output computed from them inside the head's forward.

    Args:
        model: a ``*ForCausalLM`` (or a PEFT / DDP / compiled wrapper of one). Under FSDP2 call the wrapped
            :class:`CausalLMLogps` instead, so that FSDP sees the head's forward.
        input_ids: padded ``(R, T)``, or one packed row ``(1, N)`` / ``(N,)`` together with ``cu_seqlens``.
        labels: same shape as ``input_ids``; Hugging Face style with ``shift=True`` (the default: position t is
            predicted from position t-1), aligned with ``shift=False``. ``ignore_index`` marks prompt and padding.
            Or a :class:`tspin_kernels.CountedPositions` over the ``(R*T)`` hidden rows, for layouts whose rows
            repeat (the shared-prefix layout, :mod:`tspin_kernels.integrations.shared_prefix`): ``attention_mask``
            is then the layout's 4D mask or BlockMask, passed to the backbone as is, and ``shift`` does not apply.
        attention_mask: padded rows: positions where it is 0 never count, whatever ``labels`` holds. With
            ``attn_implementation="varlen_sdpa"`` it may be the rows' :class:`AttentionSegments` (packed rows, and
            counted positions), which spares the attention reading the sequence offsets back from the device.
        position_ids: optional; for packed rows they default to positions restarting per sequence.
        cu_seqlens: ``(S+1,)`` offsets of the packed sequences; the shift stays inside each sequence.
        average, impl, backward, grad_filter_eps, tiles, chunk_elements: as in
            :func:`tspin_kernels.sequence_logps`.
        validate: ``True`` also checks values: labels in range, ``cu_seqlens`` offsets, no padding in a packed row
            and ``position_ids`` restarting per sequence (host syncs). ``False``: the caller vouches for them (e.g.
            checked on the CPU at collation); only types and shapes are checked, and this function adds no host
            sync of its own besides the kernels' one ``nonzero`` (the backbone's own, if any, are transformers').
        loss: a :class:`LossSpec`: return its ``TSPINOutput`` / ``SPINOutput`` instead of the log-probs.
    """
    _check_model_inputs(input_ids, labels, attention_mask, position_ids, cu_seqlens, check_flag("validate", validate))
    decoder, head = backbone_and_head(model)
    backbone_kwargs = {}
    if isinstance(attention_mask, AttentionSegments):
        name = attention_implementation(model)
        if name != VARLEN_SDPA:
            raise ValueError(f"attention_mask: AttentionSegments are for attn_implementation={VARLEN_SDPA!r}; this "
                             f"model runs {name!r}")
        backbone_kwargs["attention_segments"], attention_mask = attention_mask, None
    explicit = isinstance(labels, CountedPositions)
    if explicit:
        shift = False  # each triple already names the row that predicts its target
    elif cu_seqlens is not None:
        input_ids, labels = input_ids.reshape(1, -1), labels.reshape(1, -1)
        if position_ids is None:
            position_ids = packed_position_ids(cu_seqlens.to(input_ids.device), total=input_ids.shape[1])
        position_ids = position_ids.reshape(1, -1).long()
        attention_mask = None  # an explicit mask would switch off transformers' packed-sequence detection
    elif attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, ignore_index)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  **backbone_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if explicit:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.to(hidden.device)
    elif cu_seqlens is not None:
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        cu_seqlens = cu_seqlens.to(hidden.device)
    opts = dict(cu_seqlens=cu_seqlens, ignore_index=ignore_index, shift=shift, average=average, impl=impl,
                backward=backward, grad_filter_eps=grad_filter_eps, tiles=tiles, chunk_elements=chunk_elements,
                validate=validate)
    if isinstance(head, _FusedLogpsHead):
        return head(hidden, labels, loss=loss, **opts)  # through the module call, so FSDP2's hooks run around it
    return _head_logps(hidden, head.weight, getattr(head, "bias", None), labels, loss=loss, **opts)


class CausalLMLogps(nn.Module):
    """The module to train and to wrap (DDP, ``fully_shard``): ``forward`` = :func:`causal_lm_sequence_logps`.

    ``self.model`` is the Hugging Face model (PEFT-wrapped or not); its head gets the fused forward. ``generate``
    delegates to the model (under FSDP2, :func:`tspin.wrapping.wrap_model` registers it as a forward method so
    the root's parameters are gathered).
    """

    def __init__(self, model: nn.Module, *, impl: str = "auto", ignore_index: int = -100,
                 backward: str | None = None, grad_filter_eps: float | None = None, tiles: dict | None = None,
                 chunk_elements: int | None = None, validate: bool = True):
        super().__init__()
        check_impl(impl)
        check_options(backward, grad_filter_eps, tiles, chunk_elements)
        self.model = model
        self.impl = impl
        self.ignore_index = ignore_index
        self.validate = check_flag("validate", validate)
        self.kernel_options = dict(backward=backward, grad_filter_eps=grad_filter_eps, tiles=tiles,
                                   chunk_elements=chunk_elements)
        self.synced_generation = False  # set under FSDP2 with several ranks: each forward is a collective
        install_fused_head(model)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, cu_seqlens=None, *,
                shift: bool = True, average: bool = False, impl: str | None = None, validate: bool | None = None,
                loss: LossSpec | None = None):
        """``impl`` / ``validate``: this call's, instead of the constructor's (``None``: the constructor's).
        ``loss``: a :class:`LossSpec`; the call then returns the loss's output (computed in the head's forward)."""
        return causal_lm_sequence_logps(
            self.model, input_ids, labels, attention_mask=attention_mask, position_ids=position_ids,
            cu_seqlens=cu_seqlens, shift=shift, average=average, ignore_index=self.ignore_index,
            impl=self.impl if impl is None else impl, validate=self.validate if validate is None else validate,
            loss=loss, **self.kernel_options)

    def generate(self, *args, **kwargs):
        if self.synced_generation:  # ranks finish at different steps; keep running forwards until all are done
            kwargs.setdefault("synced_gpus", True)
        return self.model.generate(*args, **kwargs)
