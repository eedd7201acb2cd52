"""Shared by the integration / distributed tests and their torchrun worker: a tiny real Llama and T-SPIN batches."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tspin_kernels import tspin_loss_from_logps
from tspin_kernels.integrations import pack_padded

VOCAB = 61


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).float()
    with torch.no_grad():  # HF inits the norms to 1: perturb them so their gradients are not trivially shared
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def triplet_batch(num_triplets: int = 4, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded rows [real_0..; generated_0..; proto_0..], prompt tokens and padding labelled -100."""
    g = torch.Generator().manual_seed(seed)
    rows = 3 * num_triplets
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=g)
    prompt = torch.randint(2, length // 2, (num_triplets,), generator=g).repeat(3)  # one prompt per triplet
    pos = torch.arange(length)
    mask = (pos[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill((mask == 0) | (pos[None] < prompt[:, None]), -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def triplet_rows(batch: dict, triplets: list[int]) -> dict[str, torch.Tensor]:
    """The rows of the given triplets, still ordered [real; generated; proto]."""
    b = batch["input_ids"].shape[0] // 3
    idx = torch.tensor([k * b + t for k in range(3) for t in triplets])
    return {k: v[idx] for k, v in batch.items()}


def packed(rows: dict) -> dict[str, torch.Tensor]:
    ids, labels, pos, cu = pack_padded(rows["input_ids"], rows["labels"], rows["attention_mask"])
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu}


def tspin_step_loss(logps_fn, rows: dict, beta: float = 0.1):
    logps = logps_fn(**rows)
    real, gen, proto = logps.chunk(3)
    return tspin_loss_from_logps(real, gen, proto, alpha=1.0, beta=beta), logps
