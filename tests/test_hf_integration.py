"""causal_lm_sequence_logps on a real (tiny, random) Llama vs the naive path: model(...).logits -> log_softmax ->
gather -> masked per-row sum, values and gradients, padded and packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import LlamaModel

from tests._hf_tiny import VOCAB, tiny_llama, triplet_batch
from tspin_kernels.integrations import (
    CausalLMLogps,
    causal_lm_sequence_logps,
    install_fused_head,
    pack_padded,
    packed_position_ids,
)


def naive_logps(model, input_ids, labels, attention_mask, *, shift=True, average=False):
    """What a plain Hugging Face loop computes: full logits of every position, HF label shift, padded rows."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    labels = labels.masked_fill(attention_mask == 0, -100)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    tok = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * mask
    out = tok.sum(-1)
    return out / mask.sum(-1).clamp_min(1) if average else out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_against_naive(model, batch, **kw):
    ours = causal_lm_sequence_logps(model, batch["input_ids"], batch["labels"],
                                    attention_mask=batch["attention_mask"], **kw)
    (ours * torch.linspace(0.5, 1.5, ours.numel())).sum().backward()  # distinct weights per row
    g_ours = _grads(model)
    model.zero_grad(set_to_none=True)
    ref = naive_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"], **kw)
    (ref * torch.linspace(0.5, 1.5, ref.numel())).sum().backward()
    g_ref = _grads(model)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert set(g_ours) == set(g_ref) and len(g_ref) == len(list(model.parameters()))
    for name, g in g_ref.items():
        torch.testing.assert_close(g_ours[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    return ours


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("average", [False, True])
def test_padded_matches_naive_with_prompt_masking(attn, average):
    model = tiny_llama(0, attn_implementation=attn)
    batch = triplet_batch(2)
    out = _check_against_naive(model, batch, average=average)
    assert out.shape == (6,) and out.dtype == torch.float32 and (out < 0).all()


def test_aligned_labels_without_shift():
    model = tiny_llama(0)
    batch = triplet_batch(1)
    aligned = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], dim=1)
    shifted = causal_lm_sequence_logps(model, batch["input_ids"], batch["labels"],
                                       attention_mask=batch["attention_mask"])
    plain = causal_lm_sequence_logps(model, batch["input_ids"], aligned, attention_mask=batch["attention_mask"],
                                     shift=False)
    torch.testing.assert_close(plain, shifted)
    _check_against_naive(model, {**batch, "labels": aligned}, shift=False)


def test_labels_under_padding_never_count():
    model = tiny_llama(0)
    batch = triplet_batch(1)
    dirty = torch.where(batch["attention_mask"] == 0, torch.full_like(batch["labels"], 5), batch["labels"])
    a = causal_lm_sequence_logps(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
    b = causal_lm_sequence_logps(model, batch["input_ids"], dirty, attention_mask=batch["attention_mask"])
    torch.testing.assert_close(a, b)


def test_head_with_bias_and_tied_embeddings():
    model = tiny_llama(0)
    model.lm_head = nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        model.lm_head.bias.normal_()
    _check_against_naive(model, triplet_batch(1))
    tied = tiny_llama(0, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    _check_against_naive(tied, triplet_batch(1))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_matches_naive_padded(attn):
    """transformers builds the block-diagonal mask from position_ids restarting per sequence (no attention_mask)."""
    model = tiny_llama(0, attn_implementation=attn)
    batch = triplet_batch(2)
    ids, labels, pos, cu = pack_padded(batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert ids.shape[0] == 1 and cu.numel() == 7
    packed = causal_lm_sequence_logps(model, ids, labels, cu_seqlens=cu)  # position_ids derived from cu_seqlens
    explicit = causal_lm_sequence_logps(model, ids[0], labels[0], position_ids=pos, cu_seqlens=cu)
    ref = naive_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit, packed)


def test_packed_without_restarting_positions_would_leak_across_sequences():
    """The guard is needed: one causal mask over the whole packed row changes every sequence after the first."""
    model = tiny_llama(0)
    batch = triplet_batch(1)
    ids, labels, _, cu = pack_padded(batch["input_ids"], batch["labels"], batch["attention_mask"])
    good = causal_lm_sequence_logps(model, ids, labels, cu_seqlens=cu)
    with pytest.raises(ValueError, match="position_ids"):
        causal_lm_sequence_logps(model, ids, labels, cu_seqlens=cu, position_ids=torch.arange(ids.shape[1]))
    from tspin_kernels import sequence_logps

    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]  # plain causal over the whole row
    leaky = sequence_logps(hidden, model.lm_head.weight, labels[0], cu_seqlens=cu, shift=True)
    torch.testing.assert_close(leaky[0], good[0])  # the first sequence sees nothing before it either way
    assert not torch.allclose(leaky[1:], good[1:], atol=1e-3)


def test_peft_wrapped_model_and_module_wrapper():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(0)
    batch = triplet_batch(1)
    ref = causal_lm_sequence_logps(base, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
    peft_model = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    through_peft = causal_lm_sequence_logps(peft_model, batch["input_ids"], batch["labels"],
                                            attention_mask=batch["attention_mask"])
    torch.testing.assert_close(through_peft, ref)  # LoRA B starts at zero
    policy = CausalLMLogps(tiny_llama(0))
    torch.testing.assert_close(policy(batch["input_ids"], batch["labels"], batch["attention_mask"]), ref)
    by_reference = policy(batch["input_ids"], batch["labels"], batch["attention_mask"], impl="reference")
    torch.testing.assert_close(by_reference, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl"):
        policy(batch["input_ids"], batch["labels"], batch["attention_mask"], impl="fast")


def test_fused_head_keeps_plain_forward_and_state_dict():
    model = tiny_llama(0)
    ids = triplet_batch(1)["input_ids"]
    keys, logits = list(model.state_dict()), model(input_ids=ids).logits
    head = install_fused_head(model)
    assert install_fused_head(model) is head and isinstance(head, nn.Linear)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(input_ids=ids).logits, logits)
    out = model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_triton_impl_through_the_interpreter():
    pytest.importorskip("triton")
    model = tiny_llama(0)
    batch = triplet_batch(1)
    kw = dict(attention_mask=batch["attention_mask"])
    torch_out = causal_lm_sequence_logps(model, batch["input_ids"], batch["labels"], impl="torch", **kw)
    try:
        triton_out = causal_lm_sequence_logps(model, batch["input_ids"], batch["labels"], impl="triton", **kw)
    except ValueError as e:  # triton imported before TRITON_INTERPRET was set (not the case under conftest)
        pytest.skip(str(e))
    torch.testing.assert_close(triton_out, torch_out, rtol=1e-4, atol=1e-4)


def test_packed_position_ids():
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    assert packed_position_ids(cu).tolist() == [0, 1, 2, 0, 1]


def test_bad_inputs_name_the_argument():
    model = tiny_llama(0)
    b = triplet_batch(1)
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    with pytest.raises(ValueError, match="labels"):
        causal_lm_sequence_logps(model, ids, labels[:, 1:])
    with pytest.raises(TypeError, match="input_ids"):
        causal_lm_sequence_logps(model, ids.float(), labels)
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_sequence_logps(model, ids, labels, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_sequence_logps(model, ids[0], labels[0])
    p_ids, p_lab, _, cu = pack_padded(ids, labels, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_sequence_logps(model, p_ids, p_lab, cu_seqlens=cu, attention_mask=torch.zeros_like(p_ids))
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_sequence_logps(model, p_ids.expand(2, -1), p_lab.expand(2, -1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        causal_lm_sequence_logps(model, p_ids, p_lab, cu_seqlens=cu[:-1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        causal_lm_sequence_logps(model, p_ids, p_lab, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="attention_mask"):
        pack_padded(ids, labels, mask.flip(1))  # left padding
    with pytest.raises(TypeError, match="model"):
        causal_lm_sequence_logps(LlamaModel(model.config), ids, labels)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        causal_lm_sequence_logps(model, ids, labels)


def test_kernel_options_and_validate_reach_the_kernels(monkeypatch):
    """CausalLMLogps passes its kernel options to every call; forward's impl/validate override the constructor's."""
    from tests._oracle import spy
    from tspin_kernels import functions

    model = tiny_llama(0)
    b = triplet_batch(1)
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    used = []
    spy(monkeypatch, functions, "logps_backward_matmul", lambda *a, **k: used.append(k["tiles"]))
    policy = CausalLMLogps(model, impl="triton", backward="matmul", tiles={"bwd": "32,32,16,4,1"})
    ref = causal_lm_sequence_logps(tiny_llama(0), ids, labels, attention_mask=mask, impl="reference")
    out = policy(ids, labels, mask)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert used == [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)]
    p_ids, p_lab, _, cu = pack_padded(ids, labels, mask)
    wrong_positions = torch.arange(p_ids.shape[1])
    with pytest.raises(ValueError, match="position_ids"):
        policy(p_ids, p_lab, position_ids=wrong_positions, cu_seqlens=cu)
    # the caller vouches: value checks are skipped (and the wrong positions are used as given)
    unchecked = CausalLMLogps(model, impl="torch", validate=False)
    assert unchecked(p_ids, p_lab, position_ids=wrong_positions, cu_seqlens=cu).shape == (3,)
    with pytest.raises(ValueError, match="position_ids"):
        unchecked(p_ids, p_lab, position_ids=wrong_positions, cu_seqlens=cu, validate=True)


def test_bad_options_name_the_argument():
    model = tiny_llama(0)
    b = triplet_batch(1)
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    for kw, exc, match in [(dict(backward="fast"), ValueError, "backward: expected one of"),
                           (dict(validate="no"), TypeError, "validate: expected True or False"),
                           (dict(impl="gpu"), ValueError, "impl: expected one of"),
                           (dict(tiles={"fwd": "1,2,3,4,5"}), ValueError, r"tiles\['fwd'\] must be"),
                           (dict(grad_filter_eps=2.0), ValueError, "grad_filter_eps: expected")]:
        with pytest.raises(exc, match=match):
            CausalLMLogps(model, **kw)
        with pytest.raises(exc, match=match):
            causal_lm_sequence_logps(model, ids, labels, attention_mask=mask, **kw)
    p_ids, p_lab, _, cu = pack_padded(ids, labels, mask)
    with pytest.raises(TypeError, match="cu_seqlens: expected an integer torch.Tensor"):
        causal_lm_sequence_logps(model, p_ids, p_lab, cu_seqlens=cu.tolist())
    with pytest.raises(ValueError, match="cu_seqlens: must be non-decreasing"):
        causal_lm_sequence_logps(model, p_ids, p_lab, cu_seqlens=cu[[0, 2, 1, 3]])
    with pytest.raises(TypeError, match="attention_mask: expected a torch.Tensor, AttentionSegments or None"):
        causal_lm_sequence_logps(model, ids, labels, attention_mask=mask.tolist())
