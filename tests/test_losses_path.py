"""The loss path (backbone hidden states -> tspin_kernels with the LM-head weight) against a naive
`model(...).logits` computation on a real tiny Llama: values and gradients, padded and packed layouts."""

import pytest
import torch
import torch.nn.functional as F
from _trainer_helpers import one_thread, tiny_model_dir, tiny_policy  # noqa: F401 (one_thread: autouse fixture)

from tspin.batch import collate
from tspin.data import build_features
from tspin.experiments.demo import build_tokenizer, make_task
from tspin.losses import compute_loss, policy_logps
from tspin_kernels.integrations import backbone_and_head

FIELDS = ("real", "generated", "proto")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tiny_model_dir(tmp_path_factory.mktemp("m"), hidden=32, layers=2, heads=2)
    tok = build_tokenizer()
    rows = make_task(5, seed=3)
    recs = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "real": r["response"],
             "generated": r["response"][::-1] + "a", "proto": r["response"][:2]} for r in rows]
    feats = build_features(recs, tok, FIELDS, template="paper", max_length=40, max_prompt_length=24)
    return d, tok, feats


def naive_logps(policy, feats, fields):
    """Unpadded, one sequence at a time, through the full LM head: the obvious computation."""
    model, out = policy.model, []
    for f in fields:
        for feat in feats:
            ids, labels = (torch.tensor(x)[None] for x in feat[f])
            logits = model(input_ids=ids).logits.float()
            lp = F.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(lp[labels[0, 1:] != -100].sum())
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prefix"])
@pytest.mark.parametrize("impl", ["torch", "reference", "triton"])
def test_policy_logps_matches_naive_values_and_grads(setup, layout, impl):
    d, tok, feats = setup
    model = tiny_policy(d)
    batch = collate(feats, FIELDS, tok.pad_token_id, layout)
    lp = policy_logps(model, batch, impl=impl)
    (lp * torch.linspace(0.5, 1.5, lp.numel())).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = naive_logps(model, feats, FIELDS)
    (ref * torch.linspace(0.5, 1.5, ref.numel())).sum().backward()
    torch.testing.assert_close(lp, ref, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=f"grad of {n}")


def _shapes(out):
    return tuple(out.shape) if isinstance(out, torch.Tensor) else tuple(tuple(t.shape) for t in out)


@pytest.mark.parametrize("fused", [False, True])
def test_lm_head_never_runs_over_the_sequence(setup, fused):
    d, tok, feats = setup
    model = tiny_policy(d)
    _, head = backbone_and_head(model.model)
    outputs = []
    head.register_forward_hook(lambda module, args, out: outputs.append(_shapes(out)))
    batch = collate(feats, FIELDS, tok.pad_token_id)
    compute_loss(model, batch, method="tspin", fused=fused)[0].backward()
    # the head's module is called (FSDP2 gathers its weight around that call), but its fused forward hands back
    # the loss and one log-prob per row, on either path: no [rows x tokens x vocab] logits
    B = batch.num_examples
    assert outputs == [((), (B,), (B,), (B,))]
    model.model(input_ids=torch.tensor([[1, 2, 3]]))  # the hook does see a plain forward's logits
    assert outputs[-1] == (1, 3, len(tok))


def test_compute_loss_formulas(setup):
    d, tok, feats = setup
    model = tiny_policy(d)
    with torch.no_grad():
        ref = naive_logps(model, feats, FIELDS)
        real, gen, proto = ref.chunk(3)
        b = collate(feats, FIELDS, tok.pad_token_id)
        loss, m = compute_loss(model, b, method="tspin", alpha=0.5, beta=0.3)
        want = (-F.logsigmoid(0.5 * (real - gen)) - 0.3 * F.logsigmoid(0.5 * (gen - proto))).sum()
        torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)
        assert m["logps/proto"] == pytest.approx(proto.mean().item(), abs=1e-4)
        assert m["margins/history"] == pytest.approx((gen - proto).mean().item(), abs=1e-4)
        assert m["rewards/accuracies"] == pytest.approx((real > gen).float().mean().item())

        for f in feats:
            f["ref"] = {"real": -3.0, "generated": -4.0}
        b = collate(feats, ("real", "generated"), tok.pad_token_id)
        loss, m = compute_loss(model, b, method="spin", spin_lambda=0.2)
        want = -F.logsigmoid(0.2 * ((real + 3.0) - (gen + 4.0))).sum()
        torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)
        assert m["rewards/real"] == pytest.approx((0.2 * (real + 3.0)).mean().item(), abs=1e-4)

        b = collate(feats, ("real",), tok.pad_token_id)
        loss, m = compute_loss(model, b, method="sft")
        torch.testing.assert_close(loss, -real.sum(), rtol=1e-4, atol=1e-4)
        assert m["nll/token"] == pytest.approx(-real.sum().item() / b.num_tokens, rel=1e-4)
        for f in feats:
            del f["ref"]


def test_spin_without_reference_is_an_error(setup):
    d, tok, feats = setup
    model = tiny_policy(d)
    with pytest.raises(ValueError, match="ref_logps"):
        compute_loss(model, collate(feats, ("real", "generated"), tok.pad_token_id), method="spin")


def test_methods_and_losses_are_named_in_one_place(setup):
    """tspin.methods decides which loss a method runs and which rows it reads; the config, the batches and the
    loss all ask it (an unknown name is refused there, with the names it knows)."""
    from tspin.batch import fields_for
    from tspin.config import METHODS
    from tspin.methods import LOSS_FIELDS, loss_of

    assert METHODS == ("tspin", "spin", "sft")
    assert [loss_of(m) for m in METHODS] == ["tspin", "spin", "sft"] and loss_of("tspin", True) == "tspin_no_history"
    assert fields_for("tspin", no_history=True) == LOSS_FIELDS["tspin_no_history"] == ("real", "generated")
    assert loss_of("spin", no_history=True) == "spin"  # no_history is T-SPIN's ablation only
    with pytest.raises(ValueError, match="method='dpo': expected one of tspin, spin, sft"):
        fields_for("dpo")
    d, tok, feats = setup
    with pytest.raises(ValueError, match="method='dpo': expected one of tspin, tspin_no_history, spin, sft"):
        compute_loss(tiny_policy(d), collate(feats, ("real",), tok.pad_token_id), method="dpo")


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prefix"])
def test_wrapped_policy_is_called_and_matches_the_plain_model(setup, layout):
    """The trainer hands policy_logps the wrapped policy: it must go through the module call (DDP / FSDP2 hooks)
    and give the plain model's values."""
    from tspin_kernels.integrations import causal_lm_sequence_logps, shared_prefix_sequence_logps

    d, tok, feats = setup
    batch = collate(feats, FIELDS, tok.pad_token_id, layout)
    policy = tiny_policy(d)
    if layout == "shared_prefix":
        plain = shared_prefix_sequence_logps(policy.model, batch.shared, impl="torch")
    else:
        plain = causal_lm_sequence_logps(policy.model, batch.input_ids, batch.labels,
                                         attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                                         cu_seqlens=batch.cu_seqlens, impl="torch")
    calls = []
    policy.register_forward_hook(lambda *a: calls.append(1))
    wrapped = policy_logps(policy, batch, impl="torch")
    assert calls == [1]
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)
    with pytest.raises(TypeError, match="model: expected the training policy"):
        policy_logps(policy.model, batch)  # a bare HF model would skip DDP's / FSDP2's hooks


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prefix"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("method", ["tspin", "spin"])
def test_fused_loss_equals_loss_on_logps(setup, layout, impl, method):
    """The trainer's fused path (the loss inside the head's forward) against log-probs then the loss: same loss,
    same metrics, same gradient on every parameter of the model."""
    d, tok, feats = setup
    fields = FIELDS if method == "tspin" else FIELDS[:2]
    if method == "spin":
        feats = [dict(f, ref={"real": -3.0 - i, "generated": -4.0 + i}) for i, f in enumerate(feats)]
    batch = collate(feats, fields, tok.pad_token_id, layout)
    runs = []
    for fused in (False, True):
        model = tiny_policy(d)
        loss, m = compute_loss(model, batch, method=method, alpha=0.7, beta=0.3, spin_lambda=0.2, impl=impl,
                               fused=fused)
        loss.backward()
        runs.append((loss.detach(), m, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, m0, g0), (l1, m1, g1) = runs
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert m1.keys() == m0.keys()
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], rtol=1e-5, atol=1e-5, msg=k)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=f"grad of {n}")


def test_loss_spec_refuses_bad_arguments(setup):
    from tspin_kernels.integrations import LossSpec, causal_lm_sequence_logps

    with pytest.raises(ValueError, match="method: expected one of 'tspin', 'tspin_no_history', 'spin'"):
        LossSpec("dpo")
    with pytest.raises(ValueError, match="beta: method='tspin_no_history' has no history term"):
        LossSpec("tspin_no_history", beta=0.0)
    with pytest.raises(ValueError, match="ref_logps: T-SPIN is reference-free"):
        LossSpec("tspin_no_history", ref_logps=torch.zeros(2))
    with pytest.raises(TypeError, match="ref_logps: method='spin' needs"):
        LossSpec("spin")
    with pytest.raises(ValueError, match="ref_logps: T-SPIN is reference-free"):
        LossSpec("tspin", ref_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="alpha"):
        LossSpec("tspin", alpha=float("nan"))
    d, tok, feats = setup
    b = collate(feats, FIELDS, tok.pad_token_id)
    with pytest.raises(TypeError, match="loss: expected a tspin_kernels.integrations.LossSpec"):
        causal_lm_sequence_logps(tiny_policy(d).model, b.input_ids, b.labels, attention_mask=b.attention_mask,
                                 loss="tspin")
