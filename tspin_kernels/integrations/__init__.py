"""Model-facing integrations of the fused log-prob kernel (Hugging Face causal LMs)."""

from .hf import CausalLMLogps, backbone_and_head, causal_lm_sequence_logps, install_fused_head, unwrap_causal_lm
from .hf_trainer import install_fused_loss
from .loss_spec import LossSpec
from .packing import pack_padded, packed_position_ids, packing_attn_implementation
from .shared_prefix import (
    SharedPrefixBatch,
    build_shared_prefix_batch,
    shared_prefix_attention_mask,
    shared_prefix_sequence_logps,
)

__all__ = [
    "CausalLMLogps", "LossSpec", "causal_lm_sequence_logps", "unwrap_causal_lm", "backbone_and_head",
    "install_fused_head",
    "packed_position_ids", "pack_padded", "packing_attn_implementation", "install_fused_loss",
    "SharedPrefixBatch", "build_shared_prefix_batch", "shared_prefix_attention_mask", "shared_prefix_sequence_logps",
]
