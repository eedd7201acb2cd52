"""FusedDPOTrainer against trl.DPOTrainer itself: the same loss, metrics and gradients (float32), for several loss
types, with and without precomputed reference log-probs, with a LoRA adapter, through a few real training steps;
and the options the fused path refuses."""

from __future__ import annotations

import copy
import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'tspin[trl]')")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from tests._trl_tiny import char_tokenizer, one_thread, preference_rows, tiny_model  # noqa: E402, F401 (fixture)
from tspin_kernels.integrations.trl import FusedDPOTrainer, check_trl_version  # noqa: E402

TOK = char_tokenizer()
LOGIT_METRICS = {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}


def _config(tmp_path, **kw) -> DPOConfig:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                save_strategy="no", disable_tqdm=True, logging_steps=1, learning_rate=1e-2, seed=0)
    base.update(kw)
    return DPOConfig(**base)


def _models(peft: bool):
    """(policy, reference): the policy differs from the reference (perturbed weights, or a random adapter)."""
    base = tiny_model(TOK)
    if peft:
        return base, None
    policy = copy.deepcopy(base)
    policy.load_state_dict(_perturbed(base.state_dict()))
    return policy, base


def _perturbed(state: dict) -> dict:
    return {n: p + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
            for n, p in state.items()}


def _lora(peft: bool):
    # init_lora_weights=False: random A and B, so that the adapter changes the model (policy != reference)
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM") if peft else None


def _trainer(cls, tmp_path, *, peft=False, data=None, trainer_kw=None, **config):
    policy, ref = _models(peft)
    ds = Dataset.from_dict(data or preference_rows(8))
    return cls(model=policy, ref_model=ref, args=_config(tmp_path, **config), train_dataset=ds,
               processing_class=TOK, peft_config=_lora(peft), **(trainer_kw or {}))


def _one_loss(trainer):
    """Loss, metrics and gradients of the first training batch, as ``training_step`` computes them."""
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), metrics, grads


def _assert_same(ours, theirs, *, rtol=1e-5, atol=1e-6, skip=()):
    (loss_a, met_a, g_a), (loss_b, met_b, g_b) = ours, theirs
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert set(met_a) == set(met_b) - set(skip), (sorted(met_a), sorted(met_b))
    for key in met_a:
        assert math.isclose(met_a[key], met_b[key], rel_tol=10 * rtol, abs_tol=10 * atol), (key, met_a[key],
                                                                                         met_b[key])
    assert set(g_a) == set(g_b) and g_a
    for name in g_b:
        assert g_b[name].abs().sum() > 0, f"{name}: no gradient in TRL's path either: a vacuous comparison"
        torch.testing.assert_close(g_a[name], g_b[name], rtol=100 * rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


CASES = [
    pytest.param(["sigmoid"], {}, id="sigmoid"),
    pytest.param(["ipo"], {}, id="ipo"),
    pytest.param(["hinge"], {}, id="hinge"),
    pytest.param(["sigmoid", "sft"], {"loss_weights": [1.0, 0.5]}, id="sigmoid+sft"),
    pytest.param(["sigmoid"], {"ld_alpha": 0.5}, id="ld_alpha"),
    pytest.param(["sigmoid"], {"use_weighting": True}, id="wpo-weighting"),
]


@pytest.mark.parametrize("loss_type,extra", CASES)
@pytest.mark.parametrize("precompute", [False, True], ids=["live-ref", "precomputed-ref"])
def test_loss_metrics_and_grads_equal_trl(tmp_path, loss_type, extra, precompute):
    kw = dict(loss_type=loss_type, precompute_ref_log_probs=precompute, beta=0.5, **extra)
    theirs = _one_loss(_trainer(DPOTrainer, tmp_path / "trl", **kw))
    ours = _one_loss(_trainer(FusedDPOTrainer, tmp_path / "ours", **kw))
    _assert_same(ours, theirs)


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo"]])
@pytest.mark.parametrize("precompute", [False, True], ids=["live-ref", "precomputed-ref"])
def test_lora_adapter_equals_trl(tmp_path, loss_type, precompute):
    """PEFT: the reference is the base model with the adapter disabled; only the adapter's weights get gradients."""
    kw = dict(loss_type=loss_type, precompute_ref_log_probs=precompute, beta=0.5, peft=True)
    theirs = _one_loss(_trainer(DPOTrainer, tmp_path / "trl", **kw))
    ours = _one_loss(_trainer(FusedDPOTrainer, tmp_path / "ours", **kw))
    assert all("lora_" in name for name in ours[2])
    _assert_same(ours, theirs)


def test_reference_under_accelerates_bf16_autocast_equals_trl(tmp_path):
    """With bf16=True Accelerate wraps the reference's forward in autocast when DPOTrainer prepares it; the fused
    forward that replaces TRL's afterwards must compute under that same autocast."""
    theirs = _one_loss(_trainer(DPOTrainer, tmp_path / "trl", bf16=True))
    ours = _one_loss(_trainer(FusedDPOTrainer, tmp_path / "ours", bf16=True))
    _assert_same(ours, theirs)


def test_precomputed_reference_logps_go_through_the_fused_head(tmp_path):
    """The precompute pass runs inside DPOTrainer.__init__; ours already does it through the fused head (TRL's path
    never calls the head module: it reads its weight), and stores the same numbers as TRL."""
    policy, ref = _models(False)
    calls = []
    ref.lm_head.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs.get("labels") is not None
                                                                                or len(args) > 1),
                                      with_kwargs=True)
    ds = Dataset.from_dict(preference_rows(8))
    args = _config(tmp_path / "ours", precompute_ref_log_probs=True)
    ours = FusedDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=TOK)
    assert calls and all(calls), "the reference log-probs were not computed by the fused head"
    theirs = _trainer(DPOTrainer, tmp_path / "trl", precompute_ref_log_probs=True)
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(ours.train_dataset[col]), torch.tensor(theirs.train_dataset[col]),
                                   rtol=1e-5, atol=1e-5)


def test_training_steps_equal_trl_under_bf16_autocast(tmp_path):
    """Three optimizer steps through Trainer.train (Accelerate's bf16 autocast wraps both models' forwards): the
    logged metrics and the final weights agree with TRL's own run. SGD: Adam would turn the bf16 rounding noise
    of near-zero gradient entries into full-size steps, and the weights could not be compared."""
    kw = dict(max_steps=3, bf16=True, loss_type=["sigmoid"], beta=0.5, optim="sgd", learning_rate=0.5)
    runs = {}
    for name, cls in (("trl", DPOTrainer), ("ours", FusedDPOTrainer)):
        trainer = _trainer(cls, tmp_path / name, data=preference_rows(12), **kw)
        trainer.train()
        runs[name] = (trainer.state.log_history, dict(trainer.model.named_parameters()))
    (log_a, w_a), (log_b, w_b) = runs["ours"], runs["trl"]
    steps_a = [e for e in log_a if "loss" in e]
    steps_b = [e for e in log_b if "loss" in e]
    assert len(steps_a) == len(steps_b) == 3
    for a, b in zip(steps_a, steps_b):
        assert set(a) == set(b)
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected", "entropy",
                    "mean_token_accuracy", "logits/chosen"):
            # bf16 matmuls: both paths round the logits alike, the backward's roundings differ slightly
            assert math.isclose(a[key], b[key], rel_tol=2e-2, abs_tol=1e-2), (key, a[key], b[key])
    start = _perturbed(tiny_model(TOK).state_dict())  # the policy both runs started from
    for name in w_b:
        update = (w_b[name] - start[name]).norm()
        assert update > 0, f"{name}: training did not change it"
        # per tensor: the two runs' weights differ by under 2% of what training changed
        assert (w_a[name] - w_b[name]).norm() <= 0.02 * update, (name, (w_a[name] - w_b[name]).norm(), update)


@pytest.mark.parametrize("precompute", [False, True], ids=["live-ref", "precomputed-ref"])
def test_evaluate_equals_trl(tmp_path, precompute):
    """Trainer.evaluate (model in eval mode, no grad; DPOTrainer also recomputes logits for its predictions)."""
    data = Dataset.from_dict(preference_rows(6, seed=9))
    results = {}
    for name, cls in (("trl", DPOTrainer), ("ours", FusedDPOTrainer)):
        trainer = _trainer(cls, tmp_path / name, precompute_ref_log_probs=precompute, beta=0.5,
                           trainer_kw={"eval_dataset": data}, per_device_eval_batch_size=3)
        results[name] = trainer.evaluate()
    ours, theirs = results["ours"], results["trl"]
    metrics = {k for k in theirs if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))}
    assert {"eval_loss", "eval_entropy", "eval_rewards/margins", "eval_mean_token_accuracy"} <= metrics
    assert metrics <= set(ours)
    for key in metrics:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key


def test_without_logit_metrics_the_rest_is_unchanged(tmp_path):
    theirs = _one_loss(_trainer(DPOTrainer, tmp_path / "trl", beta=0.5))
    trainer = _trainer(FusedDPOTrainer, tmp_path / "ours", beta=0.5, trainer_kw={"logit_metrics": False})
    ours = _one_loss(trainer)
    logs = {}
    trainer.log(logs)
    assert LOGIT_METRICS.isdisjoint(logs) and "rewards/margins" in logs
    _assert_same((ours[0], {k: v for k, v in ours[1].items() if k not in LOGIT_METRICS}, ours[2]), theirs,
                 skip=LOGIT_METRICS)


def test_triton_kernel_under_the_interpreter_equals_trl(tmp_path):
    data = preference_rows(4, lo=1, hi=3)
    theirs = _one_loss(_trainer(DPOTrainer, tmp_path / "trl", data=data))
    ours = _one_loss(_trainer(FusedDPOTrainer, tmp_path / "ours", data=data, trainer_kw={"impl": "triton"}))
    _assert_same(ours, theirs, rtol=1e-4, atol=1e-5)


def test_generation_is_unchanged(tmp_path):
    trainer = _trainer(FusedDPOTrainer, tmp_path)
    plain = tiny_model(TOK)
    trainer.model.load_state_dict(plain.state_dict())
    ids = TOK(["abc?"], return_tensors="pt").input_ids
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=TOK.pad_token_id)
    assert torch.equal(trainer.model.generate(ids, **kw), plain.generate(ids, **kw))
    torch.testing.assert_close(trainer.model(ids).logits, plain(ids).logits)


# ------------------------------------------------------------------------------------------------ refusals


def test_use_weighting_without_logit_metrics_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use_weighting: WPO weights need the logit statistics"):
        _trainer(FusedDPOTrainer, tmp_path, use_weighting=True, trainer_kw={"logit_metrics": False})


def test_adapter_on_the_lm_head_is_refused(tmp_path):
    ds = Dataset.from_dict(preference_rows(4))
    lora = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    with pytest.raises(TypeError, match="the fused head needs the output embedding to be an nn.Linear"):
        FusedDPOTrainer(model=tiny_model(TOK), args=_config(tmp_path), train_dataset=ds, processing_class=TOK,
                        peft_config=lora)


def test_soft_capped_logits_are_refused(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0,
                       pad_token_id=TOK.pad_token_id, bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)
    ds = Dataset.from_dict(preference_rows(4))
    with pytest.raises(NotImplementedError, match="final_logit_softcapping=30.0"):
        FusedDPOTrainer(model=Gemma2ForCausalLM(cfg), ref_model=Gemma2ForCausalLM(cfg), args=_config(tmp_path),
                        train_dataset=ds, processing_class=TOK)


def test_moe_router_aux_loss_is_refused(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                        output_router_logits=True, router_aux_loss_coef=0.01, pad_token_id=TOK.pad_token_id)
    ds = Dataset.from_dict(preference_rows(4))
    with pytest.raises(NotImplementedError, match="router_aux_loss_coef"):
        FusedDPOTrainer(model=MixtralForCausalLM(cfg), ref_model=MixtralForCausalLM(cfg), args=_config(tmp_path),
                        train_dataset=ds, processing_class=TOK)


def test_trl_versions_outside_the_tested_range():
    with pytest.raises(RuntimeError, match=r"trl 1.14.2: the fused DPO path needs trl>=1.15.0,<1.17.0"):
        check_trl_version("1.14.2")
    with pytest.warns(UserWarning, match="newer than the versions"):
        check_trl_version("1.17.0")
    check_trl_version()  # the installed one is supported
