"""Scale-down paths against the plain padded full-model path: LoRA (frozen head), gradient checkpointing, packing."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests._hf_tiny import packed, tiny_llama, triplet_batch, tspin_step_loss
from tspin.models import apply_lora, enable_gradient_checkpointing
from tspin.wrapping import wrap_model
from tspin_kernels.integrations import packing_attn_implementation


def _step(policy, rows):
    loss, logps = tspin_step_loss(policy, rows)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return loss.detach(), logps.detach(), grads


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=atol)
    assert set(a[2]) == set(b[2]) and a[2]
    for name, g in b[2].items():
        torch.testing.assert_close(a[2][name], g, rtol=100 * rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


class _MatmulFlops(TorchDispatchMode):
    """Counts 2*m*k*n for every matmul the backward dispatches, in-place addmm_ included (FlopCounterMode skips it)."""

    OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.OPS:
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            self.flops += 2 * a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


def _lora_policy(seed_b: int | None = None):
    model = apply_lora(tiny_llama(0), r=4, alpha=8)
    if seed_b is not None:
        g = torch.Generator().manual_seed(seed_b)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_lora_freezes_the_head_and_matches_the_base_model_at_init():
    rows = triplet_batch(2)
    base = _step(wrap_model(tiny_llama(0), "none"), rows)
    policy = wrap_model(_lora_policy(), "none")
    loss, logps, grads = _step(policy, rows)
    torch.testing.assert_close(loss, base[0])  # LoRA B = 0 at init: the same function as the base model
    torch.testing.assert_close(logps, base[1])
    head = policy.model.get_output_embeddings()
    assert not head.weight.requires_grad and head.weight.grad is None
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().max() > 0 for n, g in grads.items() if "lora_B" in n)


def test_frozen_head_skips_the_grad_weight_matmul():
    """Backward FLOPs drop by exactly one (N_counted x D x V) matmul when the head is frozen."""
    rows = triplet_batch(2)
    policy = wrap_model(_lora_policy(seed_b=3), "none")
    head = policy.model.get_output_embeddings()
    n_counted = int((rows["labels"][:, 1:] != -100).sum())
    V, D = head.weight.shape

    def backward_flops():
        loss, _ = tspin_step_loss(policy, rows)
        with _MatmulFlops() as fc:
            loss.backward()
        policy.zero_grad(set_to_none=True)
        return fc.flops

    frozen = backward_flops()
    head.weight.requires_grad_(True)
    trainable = backward_flops()
    head.weight.requires_grad_(False)
    assert trainable - frozen == 2 * n_counted * D * V


def test_lora_under_gradient_checkpointing_and_packing_matches_plain():
    rows = triplet_batch(2)
    plain = _step(wrap_model(_lora_policy(seed_b=3), "none"), rows)
    model = enable_gradient_checkpointing(_lora_policy(seed_b=3))
    policy = wrap_model(model, "none")
    policy.train()
    assert policy.model.get_base_model().model.layers[0].gradient_checkpointing
    _assert_same(_step(policy, packed(rows)), plain)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gradient_checkpointing_same_grads(attn):
    rows = triplet_batch(2)
    plain = _step(wrap_model(tiny_llama(0, attn_implementation=attn), "none").train(), rows)
    model = enable_gradient_checkpointing(tiny_llama(0, attn_implementation=attn))
    _assert_same(_step(wrap_model(model, "none").train(), rows), plain)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen_sdpa"])
def test_packed_equals_padded_full_model(attn):
    rows = triplet_batch(3)
    policy = wrap_model(tiny_llama(0, attn_implementation=attn), "none")
    _assert_same(_step(policy, packed(rows)), _step(policy, rows))


def test_packing_attn_implementation_on_this_machine():
    impl = packing_attn_implementation()
    assert impl in ("varlen_sdpa", "flash_attention_2")
    assert packing_attn_implementation("cpu") == "varlen_sdpa"


@pytest.mark.gpu
def test_flash_attention_varlen_packed_equals_padded():
    pytest.importorskip("flash_attn")
    rows = {k: v.cuda() for k, v in triplet_batch(3).items()}
    model = tiny_llama(0, attn_implementation="flash_attention_2").to("cuda", torch.bfloat16)
    policy = wrap_model(model, "none", info=None)
    a = _step(policy, packed(rows))
    b = _step(policy, rows)
    torch.testing.assert_close(a[1], b[1], rtol=2e-2, atol=2e-2)
