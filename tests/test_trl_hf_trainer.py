"""install_fused_loss: the plain transformers.Trainer (and model(..., labels=...)) with the causal-LM loss from the
fused kernel, against the same model computing Hugging Face's own loss from full logits."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from tests._trl_tiny import char_tokenizer, one_thread, preference_rows, tiny_model  # noqa: F401 (fixture)
from tspin_kernels.integrations import install_fused_loss

TOK = char_tokenizer()


def _batch(n=5):
    rows = preference_rows(n, seed=3)
    texts = [p + c + TOK.eos_token for p, c in zip(rows["prompt"], rows["chosen"])]
    return DataCollatorForLanguageModeling(TOK, mlm=False)([TOK(t) for t in texts])  # right-padded, pads -100


def _loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model_fused, model_plain, batch, **kw):
    ours, g_ours = _loss_and_grads(model_fused, batch, **kw)
    theirs, g_theirs = _loss_and_grads(model_plain, batch, **kw)
    assert ours.logits is None and theirs.logits is not None
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    assert set(g_ours) == set(g_theirs) and g_ours
    for name in g_theirs:
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("items", [None, 37], ids=["mean", "num_items_in_batch"])
def test_loss_and_grads_equal_hugging_faces(items):
    plain = tiny_model(TOK)
    fused = install_fused_loss(copy.deepcopy(plain))
    batch = _batch()
    kw = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    _compare(fused, plain, batch, **kw)


def test_pre_shifted_labels_equal_hugging_faces():
    plain = tiny_model(TOK)
    fused = install_fused_loss(copy.deepcopy(plain))
    batch = _batch()
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    batch["shift_labels"] = shifted.masked_fill(torch.rand(shifted.shape) < 0.3, -100)  # they take precedence
    _compare(fused, plain, batch)


@pytest.mark.parametrize("order", ["before", "after"])
def test_lora_equals_hugging_faces(order):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    plain = get_peft_model(tiny_model(TOK), copy.deepcopy(lora))
    fused = tiny_model(TOK)
    if order == "before":
        install_fused_loss(fused)
    fused = get_peft_model(fused, copy.deepcopy(lora))
    fused.load_state_dict(plain.state_dict())
    if order == "after":
        install_fused_loss(fused)
    _compare(fused, plain, _batch())


def test_trainer_with_gradient_accumulation_equals_the_plain_trainer(tmp_path):
    """Trainer.train, 2 micro-batches per step, 3 steps: the same logged losses and weights; evaluate() too."""
    rows = preference_rows(12, seed=5)
    texts = [p + c + TOK.eos_token for p, c in zip(rows["prompt"], rows["chosen"])]
    ds = Dataset.from_dict({"text": texts}).map(lambda ex: TOK(ex["text"]), remove_columns=["text"])
    runs = {}
    for name in ("plain", "fused"):
        model = tiny_model(TOK)
        if name == "fused":
            install_fused_loss(model)  # the one line
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=3, learning_rate=0.5, optim="sgd",
                                 use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
                                 disable_tqdm=True, seed=0, max_grad_norm=0.0)  # clipping would hide a scale error
        trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds.select(range(5)),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False))
        trainer.train()
        runs[name] = ([e["loss"] for e in trainer.state.log_history if "loss" in e], trainer.evaluate()["eval_loss"],
                      dict(model.named_parameters()))
    (loss_a, eval_a, w_a), (loss_b, eval_b, w_b) = runs["fused"], runs["plain"]
    assert len(loss_a) == 3
    torch.testing.assert_close(torch.tensor(loss_a), torch.tensor(loss_b), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(eval_a), torch.tensor(eval_b), rtol=1e-5, atol=1e-6)
    start = tiny_model(TOK).state_dict()
    for name in w_b:
        assert not torch.equal(w_b[name], start[name]), f"{name}: training did not change it"
        torch.testing.assert_close(w_a[name], w_b[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_without_labels_the_model_is_unchanged():
    plain = tiny_model(TOK)
    fused = install_fused_loss(copy.deepcopy(plain))
    install_fused_loss(fused)  # idempotent
    ids = TOK(["abc?"], return_tensors="pt").input_ids
    torch.testing.assert_close(fused(ids).logits, plain(ids).logits)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=TOK.pad_token_id)
    assert torch.equal(fused.generate(ids, **kw), plain.generate(ids, **kw))


def test_moe_router_aux_loss_is_refused():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                        output_router_logits=True, router_aux_loss_coef=0.01)
    with pytest.raises(NotImplementedError, match="router_aux_loss_coef=0.01"):
        install_fused_loss(MixtralForCausalLM(cfg))
