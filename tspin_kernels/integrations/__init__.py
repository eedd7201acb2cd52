"""Model-facing integrations of the fused log-prob kernel (Hugging Face causal LMs)."""

from .attention_segments import VARLEN_SDPA, AttentionSegments
from .hf import (
    CausalLMLogps,
    attention_implementation,
    backbone_and_head,
    causal_lm_sequence_logps,
    install_fused_head,
    unwrap_causal_lm,
)
from .hf_trainer import install_fused_loss
from .loss_spec import LossSpec
from .packing import pack_padded, packed_position_ids, packing_attn_implementation
from .shared_prefix import (
    SharedPrefixBatch,
    build_shared_prefix_batch,
    shared_prefix_attention_mask,
    shared_prefix_sequence_logps,
)
from .varlen_sdpa import register_varlen_sdpa, varlen_sdpa_attention

register_varlen_sdpa()  # attn_implementation="varlen_sdpa" works in from_pretrained / from_config from here on

__all__ = [
    "CausalLMLogps", "LossSpec", "causal_lm_sequence_logps", "unwrap_causal_lm", "backbone_and_head",
    "install_fused_head",
    "packed_position_ids", "pack_padded", "packing_attn_implementation", "install_fused_loss",
    "SharedPrefixBatch", "build_shared_prefix_batch", "shared_prefix_attention_mask", "shared_prefix_sequence_logps",
    "AttentionSegments", "VARLEN_SDPA", "attention_implementation", "register_varlen_sdpa", "varlen_sdpa_attention",
]
