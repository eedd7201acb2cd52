"""``attn_implementation="varlen_sdpa"`` against the padded layout under ``sdpa`` on real (tiny, random) causal LMs:
packed rows (odd lengths, one-token sequences, a single-sequence row, every sequence at the length cap) and
shared-prefix rows give the padded log-probs and every parameter gradient in float32, bfloat16 and float16; sliding
windows stay exact; nothing of the row's squared length is ever built; padded batches, a KV cache and generate()
are sdpa's; the sequences come from our host-side segments, transformers' flash keywords or position_ids alike."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests._hf_tiny import VOCAB, tiny_llama
from tests._shared_prefix_data import padded_rows, tiny_model, triplets
from tests.test_host_syncs import counter  # noqa: F401 (fixture: counts host syncs, Triton launches excluded)
from tspin_kernels.integrations import (
    AttentionSegments,
    CausalLMLogps,
    build_shared_prefix_batch,
    causal_lm_sequence_logps,
    pack_padded,
    packed_position_ids,
    shared_prefix_attention_mask,
    shared_prefix_sequence_logps,
)

# lengths of the packed sequences: odd, one-token ones, repeats (buckets of several), and 16 = the length cap
MIXED = [7, 1, 13, 16, 4, 13, 2, 16, 9, 13]
# (log-probs rtol and atol, gradient tolerance relative to the tensor's largest entry); measured: float32 0 and
# 4e-7, bfloat16 8e-4 (log-probs near 50) and 8e-3, float16 2e-4 and 2e-3
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 3e-2), torch.float16: (5e-3, 1e-2)}


def rows_of(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of ``lengths`` tokens, a prompt (labels -100) of a random share of each."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), T), generator=g)
    pos = torch.arange(T)
    mask = (pos[None] < torch.tensor(lengths)[:, None]).long()
    prompt = torch.tensor([int(torch.randint(0, max(n // 2, 1), (1,), generator=g)) for n in lengths])
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill((mask == 0) | (pos[None] < prompt[:, None]), -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def model_pair(family: str, dtype=torch.float32, **config):
    """The same random weights under sdpa (the padded reference) and varlen_sdpa."""
    if config:  # a family with config overrides (the sliding window)
        import transformers

        def build(attn):
            torch.manual_seed(0)
            cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                                             attn_implementation=attn, **config)
            return transformers.MistralForCausalLM(cfg)
        return build("sdpa").to(dtype), build("varlen_sdpa").to(dtype)
    return tiny_model(family, "sdpa").to(dtype), tiny_model(family, "varlen_sdpa").to(dtype)


def run(model, fn):
    """(output, every parameter's gradient) of a distinct weighting per sequence."""
    model.zero_grad(set_to_none=True)
    out = fn()
    (out.float() * torch.linspace(-1.0, 2.0, out.numel(), device=out.device)).sum().backward()
    return out.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()
                                  if p.grad is not None}


def assert_same(a, b, dtype=torch.float32, tolerances=None):
    tol, grad_tol = tolerances or TOL[dtype]
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert set(a[1]) == set(b[1]) and a[1]
    for name, g in b[1].items():  # float sums in another order: relative to the tensor's largest entry
        atol = grad_tol * g.abs().max().item() + 1e-8
        torch.testing.assert_close(a[1][name], g, rtol=grad_tol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def padded_run(model, rows):
    return run(model, lambda: causal_lm_sequence_logps(model, rows["input_ids"], rows["labels"],
                                                       attention_mask=rows["attention_mask"], impl="torch"))


def packed_run(model, rows, source="segments"):
    ids, labels, pos, cu = pack_padded(rows["input_ids"], rows["labels"], rows["attention_mask"])
    mask = AttentionSegments.from_cu_seqlens(cu) if source == "segments" else None
    return run(model, lambda: causal_lm_sequence_logps(model, ids, labels, cu_seqlens=cu, attention_mask=mask,
                                                       impl="torch"))


# ---------------------------------------------------------------------------------------------------------------
# Packed rows
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("source", ["segments", "position_ids"])
def test_packed_equals_padded_logps_and_every_gradient(family, source):
    sdpa, varlen = model_pair(family)
    rows = rows_of(MIXED)
    assert_same(packed_run(varlen, rows, source), padded_run(sdpa, rows))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_equals_padded_in_half_precision(dtype):
    sdpa, varlen = model_pair("llama", dtype)
    rows = rows_of(MIXED, seed=1)
    assert_same(packed_run(varlen, rows), padded_run(sdpa, rows), dtype)


@pytest.mark.parametrize("lengths", [[11], [16] * 6, [16, 16, 3, 16]], ids=["one-sequence", "all-at-cap", "cap+short"])
def test_single_sequence_and_length_cap_rows(lengths):
    """A row of one sequence, and rows whose sequences all hit the length cap (one bucket: a view of the row)."""
    sdpa, varlen = model_pair("llama")
    rows = rows_of(lengths, seed=2)
    assert_same(packed_run(varlen, rows), padded_run(sdpa, rows))


def test_transformers_flash_keywords_give_the_same_row():
    """cu_seq_lens_q / cu_seq_lens_k (DataCollatorWithFlattening(return_flash_attn_kwargs=True)) delimit the
    sequences as well as the position ids do."""
    _, varlen = model_pair("llama")
    rows = rows_of(MIXED)
    ids, _, pos, cu = pack_padded(rows["input_ids"], rows["labels"], rows["attention_mask"])
    with torch.no_grad():
        by_pos = varlen.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        by_cu = varlen.model(input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                             max_length_q=16, max_length_k=16).last_hidden_state
        leaky = varlen.model(input_ids=ids, use_cache=False).last_hidden_state  # positions 0..N-1: one sequence
    torch.testing.assert_close(by_cu, by_pos)
    assert not torch.allclose(leaky, by_pos, atol=1e-3)


def test_sliding_window_inside_each_sequence():
    """A window shorter than the sequences: each sequence's window, as sdpa's mask has it on padded rows."""
    sdpa, varlen = model_pair("mistral", sliding_window=5)
    rows = rows_of(MIXED, seed=3)
    assert_same(packed_run(varlen, rows), padded_run(sdpa, rows))
    no_window = model_pair("mistral", sliding_window=None)[1]
    assert not torch.allclose(packed_run(no_window, rows)[0], packed_run(varlen, rows)[0], atol=1e-4)


class _LargestShape(TorchDispatchMode):
    """Records every shape any operation returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("layout", ["packed", "shared_prefix"])
@pytest.mark.parametrize("attn", ["sdpa", "varlen_sdpa"])
def test_nothing_of_the_rows_squared_length(attn, layout):
    """sdpa on a row of several sequences builds (N, N) masks and scores; varlen_sdpa no tensor with two
    dimensions of the row's length N (forward and backward)."""
    model = tiny_llama(0, attn_implementation=attn)
    if layout == "packed":
        rows = rows_of(MIXED * 2)
        ids, labels, _, cu = pack_padded(rows["input_ids"], rows["labels"], rows["attention_mask"])
        N, fn = ids.shape[1], lambda: causal_lm_sequence_logps(model, ids, labels, cu_seqlens=cu, impl="torch")
    else:
        batch = build_shared_prefix_batch(triplets() + triplets(seed=1), max_row_tokens=10_000)
        N, fn = batch.input_ids.shape[1], lambda: shared_prefix_sequence_logps(model, batch, impl="torch")
    with _LargestShape() as seen:
        fn().sum().backward()
    squared = [s for s in seen.shapes if sum(d >= N for d in s) >= 2]
    assert bool(squared) == (attn == "sdpa"), squared[:3]


# ---------------------------------------------------------------------------------------------------------------
# Shared-prefix rows
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("max_row_tokens", [None, 10_000], ids=["rows+padding", "one-row"])
def test_shared_prefix_equals_padded(family, max_row_tokens):
    sdpa, varlen = model_pair(family)
    examples = triplets()
    rows = padded_rows(examples)
    batch = build_shared_prefix_batch(examples, max_row_tokens=max_row_tokens)
    assert shared_prefix_attention_mask(batch, varlen) is batch.segments  # no mask built
    out = run(varlen, lambda: shared_prefix_sequence_logps(varlen, batch, impl="torch"))
    assert_same(out, padded_run(sdpa, rows))


def test_shared_prefix_pairs_in_bfloat16():
    sdpa, varlen = model_pair("llama", torch.bfloat16)
    examples = [ex[:2] for ex in triplets(seed=3)]
    out = run(varlen, lambda: shared_prefix_sequence_logps(varlen, build_shared_prefix_batch(examples), impl="torch"))
    assert_same(out, padded_run(sdpa, padded_rows(examples)), torch.bfloat16)


def test_shared_prefix_with_a_sliding_window_is_exact():
    """Under varlen_sdpa the window is measured in each response's own positions: no refusal, the padded values."""
    sdpa, varlen = model_pair("mistral", sliding_window=6)
    examples = triplets()
    batch = build_shared_prefix_batch(examples, max_row_tokens=10_000)
    out = run(varlen, lambda: shared_prefix_sequence_logps(varlen, batch, impl="torch"))
    assert_same(out, padded_run(sdpa, padded_rows(examples)))
    with pytest.raises(NotImplementedError, match="sliding_window=6 is shorter"):
        shared_prefix_attention_mask(batch, sdpa)


# ---------------------------------------------------------------------------------------------------------------
# Everything else is sdpa's
# ---------------------------------------------------------------------------------------------------------------


def test_padded_rows_and_generate_are_sdpas():
    sdpa, varlen = model_pair("llama")
    rows = rows_of(MIXED)
    assert_same(padded_run(varlen, rows), padded_run(sdpa, rows))
    prompts = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    left_padded = torch.ones_like(prompts)
    left_padded[0, :2] = 0
    for mask in (None, left_padded):  # a KV cache, decoding one token at a time, with and without padding
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(varlen.generate(prompts, **kw), sdpa.generate(prompts, **kw), rtol=0, atol=0)


def test_segments_add_no_host_sync(counter):  # noqa: F811 (the fixture)
    """Host-side segments: the trainer path's syncs are the sdpa backbone's own plus the kernels' one nonzero;
    without them varlen_sdpa reads the position ids once per forward (not once per layer)."""
    from tests.test_host_syncs import ONE_NONZERO, _backbone_syncs, _step

    _, varlen = model_pair("llama")
    rows = rows_of(MIXED)
    ids, labels, _, cu = pack_padded(rows["input_ids"], rows["labels"], rows["attention_mask"])
    segments = AttentionSegments.from_cu_seqlens(cu)
    policy = CausalLMLogps(varlen, impl="torch", validate=False)
    params = [p for p in varlen.parameters() if p.requires_grad]
    position_ids = packed_position_ids(cu)[None]
    with_segments = _backbone_syncs(counter, varlen, ids, position_ids=position_ids, attention_segments=segments)
    assert _step(counter, lambda: policy(ids, labels, segments, None, cu).sum(), *params) == \
        with_segments + ONE_NONZERO
    sdpa_model = tiny_llama(0)
    assert with_segments == _backbone_syncs(counter, sdpa_model, ids, position_ids=position_ids)

    def forward(**kw):  # a fresh position tensor per batch, as a collator hands over
        counter.syncs.clear()
        with counter, torch.no_grad():
            varlen.model(input_ids=ids, position_ids=position_ids.clone(), use_cache=False, **kw)
        return Counter(counter.syncs)

    # one read per forward (.cpu() then .numpy() of the host copy), not one per layer (two here)
    assert forward() - forward(attention_segments=segments) == Counter(cpu=1, numpy=1)


def test_bad_segments_name_the_argument():
    _, varlen = model_pair("llama")
    rows = rows_of([5, 3])
    ids, labels, _, cu = pack_padded(rows["input_ids"], rows["labels"], rows["attention_mask"])
    with pytest.raises(ValueError, match="attention_mask: the AttentionSegments cover 9 tokens, input_ids holds 8"):
        causal_lm_sequence_logps(varlen, ids, labels, cu_seqlens=cu, attention_mask=AttentionSegments.packed([4, 5]))
    with pytest.raises(ValueError, match="AttentionSegments are for attn_implementation='varlen_sdpa'; this model "
                                         "runs 'sdpa'"):
        causal_lm_sequence_logps(tiny_llama(0), ids, labels, cu_seqlens=cu, attention_mask=AttentionSegments.packed(
            [5, 3]))
    with pytest.raises(ValueError, match="pass its cu_seqlens too"):
        causal_lm_sequence_logps(varlen, ids, labels, attention_mask=AttentionSegments.packed([5, 3]))
    with pytest.raises(ValueError, match="every one of the 8 tokens must be the query of exactly one piece"):
        AttentionSegments([(0, 5, 0, 0), (4, 4, 0, 0)], 8)
    with pytest.raises(ValueError, match="lengths: expected positive sequence lengths"):
        AttentionSegments.packed([5, 0, 3])
    with pytest.raises(TypeError, match="cu_seqlens: expected a 1-D integer tensor"):
        AttentionSegments.from_cu_seqlens(cu.float())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_packed_and_shared_prefix_equal_padded(dtype):
    """On CUDA sdpa runs its flash / memory-efficient kernels per bucket: the padded values and gradients."""
    sdpa, varlen = (m.cuda() for m in model_pair("llama", dtype))
    rows = {k: v.cuda() for k, v in rows_of(MIXED).items()}
    loose = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (3e-2, 5e-2)}[dtype]  # TF32 may be on for the matmuls
    assert_same(packed_run(varlen, rows), padded_run(sdpa, rows), tolerances=loose)
    examples = triplets()
    batch = build_shared_prefix_batch(examples, max_row_tokens=10_000).to("cuda")
    out = run(varlen, lambda: shared_prefix_sequence_logps(varlen, batch, impl="torch"))
    ref = {k: v.cuda() for k, v in padded_rows(examples).items()}
    assert_same(out, padded_run(sdpa, ref), tolerances=loose)
