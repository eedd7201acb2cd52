"""The shared-prefix layout against the padded layout on real (tiny, random) causal LMs of three families:
per-sequence log-probs and every gradient (the model's parameters, the LM head, the last hidden states) agree
within float32 tolerance; responses and examples cannot see each other; the masks take the forms transformers
passes through; what cannot be exact is refused clearly."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests._shared_prefix_data import IGNORE, padded_rows, sequence, tiny_model, triplets
from tests.test_host_syncs import counter  # noqa: F401 (fixture: counts host syncs, Triton launches excluded)
from tspin_kernels import CountedPositions, sequence_logps
from tspin_kernels.integrations import (
    backbone_and_head,
    build_shared_prefix_batch,
    causal_lm_sequence_logps,
    shared_prefix_attention_mask,
    shared_prefix_sequence_logps,
)
from tspin_kernels.integrations.shared_prefix import _dense_visible


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _weights(n):
    return torch.linspace(-1.0, 2.0, n)  # distinct per sequence, of both signs


def _run(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    (out * _weights(out.numel()).to(out)).sum().backward()
    return out.detach(), _grads(model)


def assert_same_as_padded(model, examples, *, impl="torch", max_row_tokens=None, average=False):
    rows = padded_rows(examples)
    ref, g_ref = _run(model, lambda: causal_lm_sequence_logps(model, rows["input_ids"], rows["labels"],
                                                              attention_mask=rows["attention_mask"], impl=impl,
                                                              average=average))
    batch = build_shared_prefix_batch(examples, max_row_tokens=max_row_tokens)
    out, g = _run(model, lambda: shared_prefix_sequence_logps(model, batch, impl=impl, average=average))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert set(g) == set(g_ref) and len(g) == len(list(model.parameters()))
    for name in g_ref:  # float32 sums in another order: relative to the tensor's largest entry (biases cancel)
        atol = 1e-4 * g_ref[name].abs().max().item() + 1e-8
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    return batch, out


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_logps_and_parameter_gradients_equal_padded(family, attn, impl):
    model = tiny_model(family, attn)
    batch, out = assert_same_as_padded(model, triplets(), impl=impl)
    assert out.shape == (15,) and out[5 + 4] == 0  # 5 triplets; the emptied generated response counts nothing
    assert batch.backbone_tokens < sum(len(ids) for ex in triplets() for ids, _ in ex)


@pytest.mark.parametrize("max_row_tokens", [None, 40, 10_000])
def test_several_examples_per_row(max_row_tokens):
    """Rows of one example (the default for these lengths), a few, or all five in one row: same results."""
    batch, _ = assert_same_as_padded(tiny_model("llama"), triplets(), max_row_tokens=max_row_tokens)
    rows = {None: 5, 40: 3, 10_000: 1}[max_row_tokens]  # lengths 18, 17, 17, 32, 16
    assert batch.input_ids.shape[0] == rows
    assert batch.input_ids.shape[0] * batch.input_ids.shape[1] == batch.backbone_tokens


def test_average_and_spin_pairs():
    model = tiny_model("llama")
    assert_same_as_padded(model, triplets(), average=True)
    pairs = [ex[:2] for ex in triplets(seed=3)]
    batch, out = assert_same_as_padded(model, pairs)
    assert batch.num_responses == 2 and out.shape == (10,)


def test_hidden_gradient_sums_the_shared_rows():
    """At the head: the gradient of a prefix row's hidden state is the sum of the padded rows' gradients at that
    position over the example's responses (the repeated rows of the kernel), a response row's is its padded row's."""
    model = tiny_model("llama")
    decoder, head = backbone_and_head(model)
    examples = triplets()
    B, k = len(examples), 3
    rows = padded_rows(examples)
    h_pad = decoder(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).last_hidden_state
    h_pad.retain_grad()
    pad_out = sequence_logps(h_pad, head.weight, rows["labels"], shift=True)
    (pad_out * _weights(pad_out.numel())).sum().backward()
    batch = build_shared_prefix_batch(examples, max_row_tokens=50)
    mask = shared_prefix_attention_mask(batch, model)
    h = decoder(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids).last_hidden_state
    h.retain_grad()
    out = sequence_logps(h, head.weight, batch.positions)
    (out * _weights(out.numel())).sum().backward()
    torch.testing.assert_close(out, pad_out, rtol=1e-5, atol=1e-5)
    expected = torch.zeros_like(h.grad)
    for r, t in (batch.example_ids >= 0).nonzero().tolist():
        e, b, p = batch.example_ids[r, t].item(), batch.branch_ids[r, t].item(), batch.position_ids[r, t].item()
        for j in range(k) if b == 0 else [b - 1]:
            expected[r, t] += h_pad.grad[j * B + e, p]
            torch.testing.assert_close(h[r, t], h_pad[j * B + e, p], rtol=1e-5, atol=1e-5)  # the same states
    torch.testing.assert_close(h.grad, expected, rtol=1e-5, atol=1e-6)
    assert (batch.branch_ids == 0).any() and h.grad[batch.branch_ids == 0].abs().sum() > 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_response_cannot_see_another(attn):
    """Changing one response's tokens moves its own log-prob only: not its example's other responses, not the
    other examples of the row. Changing the prompt moves all of its example's responses."""
    model = tiny_model("llama", attn)
    examples = triplets()
    base = shared_prefix_sequence_logps(model, build_shared_prefix_batch(examples, max_row_tokens=10_000))
    B = len(examples)
    changed = [list(ex) for ex in examples]
    e, j = 0, 1  # example 0's generated response
    ids, lab = changed[e][j]
    P = sum(1 for x in lab if x == IGNORE)
    new_resp = [(t + 7) % 50 + 3 for t in ids[P:]]
    changed[e][j] = sequence(ids[:P], new_resp)
    out = shared_prefix_sequence_logps(model, build_shared_prefix_batch(changed, max_row_tokens=10_000))
    moved = (out != base).nonzero().squeeze(1).tolist()
    assert moved == [j * B + e], f"only sequence {j * B + e} may move, moved: {moved}"
    changed = [list(ex) for ex in examples]
    changed[e] = [sequence([(t + 5) % 50 + 3 for t in ids[:P]], ids[P:]) for ids, _ in
                  [(s, None) for s, _ in examples[e]]]
    out = shared_prefix_sequence_logps(model, build_shared_prefix_batch(changed, max_row_tokens=10_000))
    assert sorted((out != base).nonzero().squeeze(1).tolist()) == [e, B + e, 2 * B + e]


def test_layout_of_one_example():
    """The row, positions, branches and counted triples of a hand-checked example whose responses share their
    first token (so the shared part runs one token into the responses)."""
    P = [10, 11, 12]
    ex = [sequence(P, [20, 21]), sequence(P, [20, 22, 23]), sequence(P, [30])]
    b = build_shared_prefix_batch([ex])
    assert b.prefix_lengths == (3,) and b.response_lengths == ((2, 3, 1),)  # [20] is shared by responses 1, 2 only
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21, 20, 22, 23, 30]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 3]]
    assert b.branch_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 3]]
    triples = sorted(zip(b.positions.seq_ids.tolist(), b.positions.rows.tolist(), b.positions.targets.tolist()))
    assert triples == [(0, 2, 20), (0, 3, 21), (1, 2, 20), (1, 5, 22), (1, 6, 23), (2, 2, 30)]
    assert b.positions.num_seqs == 3 and b.sequence_tokens == 9 == b.backbone_tokens
    vis = _dense_visible(b)[0].int().tolist()
    assert vis[4] == [1, 1, 1, 1, 1, 0, 0, 0, 0]  # response 1's second token: prefix + its own first token
    assert vis[7] == [1, 1, 1, 0, 0, 1, 1, 1, 0]
    assert vis[8] == [1, 1, 1, 0, 0, 0, 0, 0, 1]


def test_identical_responses_and_a_shared_first_token():
    """Three identical responses: the whole sequence is the shared part; every counted row repeats three times."""
    ex = [sequence([5, 6], [7, 8, 2])] * 3
    b = build_shared_prefix_batch([ex])
    assert b.prefix_lengths == (5,) and b.response_lengths == ((0, 0, 0),)
    assert b.positions.rows.tolist() == [1, 2, 3] * 3
    assert_same_as_padded(tiny_model("llama"), [ex, triplets()[0]])


def test_masks_per_attention_implementation():
    b = build_shared_prefix_batch(triplets(), max_row_tokens=50)
    dense = _dense_visible(b)
    sdpa = shared_prefix_attention_mask(b, "sdpa")
    if importlib.util.find_spec("transformers.masking_utils") is not None:  # >= 4.53: masks as transformers has them
        assert sdpa.dtype == torch.bool and torch.equal(sdpa[:, 0], dense)
    else:  # 4.51-4.52 models take additive float masks
        assert sdpa.dtype == torch.float32 and torch.equal(sdpa[:, 0] == 0, dense)
    eager = shared_prefix_attention_mask(b, "eager", dtype=torch.bfloat16)
    assert eager.dtype == torch.bfloat16 and torch.equal(eager[:, 0] == 0, dense)
    assert (eager[:, 0][~dense] == torch.finfo(torch.bfloat16).min).all()
    block = shared_prefix_attention_mask(b, "flex_attention")
    R, T = b.input_ids.shape
    q, kv = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for r in range(R):
        assert torch.equal(block.mask_mod(torch.tensor(r), 0, q, kv), dense[r])
    assert tuple(block.shape) == (R, 1, T, T)
    model_mask = shared_prefix_attention_mask(b, tiny_model("llama", "eager"))
    assert model_mask.dtype == torch.float32


@pytest.mark.parametrize("name", ["flash_attention_2", "flash_attention_3", "paged_attention", "my_kernel"])
def test_attention_without_arbitrary_masks_is_refused(name):
    b = build_shared_prefix_batch(triplets())
    with pytest.raises(ValueError, match=rf"attn_implementation='{name}': the shared-prefix layout needs"):
        shared_prefix_attention_mask(b, name)


def test_sliding_window_shorter_than_a_sequence_is_refused():
    import transformers

    from tests._hf_tiny import VOCAB

    b = build_shared_prefix_batch(triplets())  # longest sequence: 24 tokens
    kw = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1)
    short = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=16, **kw))
    with pytest.raises(NotImplementedError, match="config.sliding_window=16 is shorter than the longest sequence"):
        shared_prefix_attention_mask(b, short)
    long_enough = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=24, **kw))
    shared_prefix_attention_mask(b, long_enough)
    off = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(sliding_window=4, use_sliding_window=False, **kw))
    shared_prefix_attention_mask(b, off)


@pytest.mark.parametrize("bad,match", [
    ([], "examples: expected a non-empty list"),
    ([[]], r"examples\[0\]: expected a non-empty list"),
    ([[([1, 2], [-100, 2])], [([1, 2], [-100, 2])] * 2], r"examples\[1\]: expected 1 sequences like examples\[0\]"),
    ([[([1, 2, 3], [-100, 2])]], r"examples\[0\]\[0\]: labels has 2 entries, input_ids 3"),
    ([[([], [])]], r"examples\[0\]\[0\]: empty sequence"),
    ([[("ab", [1, 2])]], r"examples\[0\]\[0\] input_ids: expected a list of ints"),
    ([[([1.0, 2.0], [1, 2])]], r"examples\[0\]\[0\] input_ids: expected a list of ints"),
    ([[(torch.ones(2), [1, 2])]], r"examples\[0\]\[0\] input_ids: expected a 1-D integer tensor"),
    ([[([1, 2],)]], r"examples\[0\]\[0\]: expected an \(input_ids, labels\) pair"),
])
def test_bad_examples_name_the_spot(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_shared_prefix_batch(bad)


def test_bad_options_and_inputs():
    ex = triplets()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_row_tokens: expected a positive int or None"):
            build_shared_prefix_batch(ex, max_row_tokens=bad)
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="batch: expected a SharedPrefixBatch"):
        shared_prefix_sequence_logps(model, padded_rows(ex))
    b = build_shared_prefix_batch(ex)
    with pytest.raises(ValueError, match=r"attention_mask: with counted positions expected the layout's 4D mask"):
        causal_lm_sequence_logps(model, b.input_ids, b.positions, attention_mask=torch.ones_like(b.input_ids))
    with pytest.raises(ValueError, match="position_ids: expected the shape of input_ids"):
        causal_lm_sequence_logps(model, b.input_ids, b.positions, position_ids=b.position_ids[:, :-1])
    with pytest.raises(ValueError, match="labels.rows: values must be in"):
        bad_pos = CountedPositions(b.positions.rows + b.backbone_tokens, b.positions.targets, b.positions.seq_ids,
                                   b.positions.num_seqs)
        causal_lm_sequence_logps(model, b.input_ids, bad_pos, attention_mask=shared_prefix_attention_mask(b, model),
                                 position_ids=b.position_ids)


@pytest.mark.slow
def test_flex_attention_forward_on_cpu_equals_padded():
    """FlexAttention runs forward only on the CPU (it compiles there: about a minute); values against padded.
    The GPU test (test_kernels_gpu / benchmarks) runs forward and backward."""
    if importlib.util.find_spec("transformers.masking_utils") is None:
        pytest.skip("transformers < 4.53 asks CPU flex attention for the log-sum-exp, which it cannot return")
    model, flex = tiny_model("llama", "sdpa"), tiny_model("llama", "flex_attention")  # the same weights
    rows = padded_rows(triplets())
    with torch.no_grad():
        ref = causal_lm_sequence_logps(model, rows["input_ids"], rows["labels"], attention_mask=rows["attention_mask"])
        out = shared_prefix_sequence_logps(flex, build_shared_prefix_batch(triplets(), max_row_tokens=10_000))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gpu_shared_prefix_equals_padded(attn, impl):
    """On CUDA: the compiled Triton kernel with repeated rows, and FlexAttention forward and backward."""
    model = tiny_model("llama", attn).cuda()
    pad_model = tiny_model("llama", "sdpa").cuda()  # the same weights, the padded layout's attention
    examples = triplets()
    rows = {k: v.cuda() for k, v in padded_rows(examples).items()}
    ref, g_ref = _run(pad_model, lambda: causal_lm_sequence_logps(pad_model, rows["input_ids"], rows["labels"],
                                                                  attention_mask=rows["attention_mask"], impl=impl))
    batch = build_shared_prefix_batch(examples, max_row_tokens=10_000 if attn == "flex_attention" else None).to("cuda")
    out, g = _run(model, lambda: shared_prefix_sequence_logps(model, batch, impl=impl))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # TF32 may be on for the backbone's matmuls
    for name in g_ref:
        atol = 1e-3 * g_ref[name].abs().max().item() + 1e-7
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-3, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_trainer_path_adds_no_host_sync(counter, impl):  # noqa: F811 (the fixture)
    """CausalLMLogps(validate=False) on a shared-prefix batch: the counted positions need no compaction, so our
    code adds no host sync at all to the backbone's own (the mask is built on the device without one either)."""
    from tests.test_host_syncs import _backbone_syncs, _step
    from tspin_kernels import tspin_loss_from_logps
    from tspin_kernels.integrations import CausalLMLogps

    model = tiny_model("llama")
    batch = build_shared_prefix_batch(triplets())
    with counter:
        mask = shared_prefix_attention_mask(batch, model)
    assert not counter.syncs
    policy = CausalLMLogps(model, impl=impl, validate=False)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        real, generated, proto = policy(batch.input_ids, batch.positions, mask, batch.position_ids).chunk(3)
        return tspin_loss_from_logps(real, generated, proto)

    backbone = _backbone_syncs(counter, model, batch.input_ids, attention_mask=mask, position_ids=batch.position_ids)
    assert _step(counter, step, *params) == backbone
