"""TSPINTrainer: the T-SPIN loss on (prompt, real, generated, proto) triplets through the plain Trainer and the fused
kernels, checked against a full-logits computation on the same rows; gradient accumulation, LoRA, conversational
data, files written by `tspin iterate`, and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig

from tests._trl_tiny import char_tokenizer, one_thread, tiny_model, triplet_rows  # noqa: F401 (fixture)
from tspin_kernels import tspin_loss_from_logps
from tspin_kernels.integrations.tspin_trainer import FIELDS, TSPINConfig, TSPINTrainer

TOK = char_tokenizer()
CHAT = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}a:{% endif %}")


def _config(tmp_path, **kw) -> TSPINConfig:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True, bf16=False,
                save_strategy="no", disable_tqdm=True, logging_steps=1, learning_rate=0.05, optim="sgd", seed=0,
                max_grad_norm=0.0, alpha=1.5, beta=0.3)  # no clipping: it would hide a wrongly scaled gradient
    base.update(kw)
    return TSPINConfig(**base)


def _full_logits_loss(model, batch, alpha, beta):
    """Independent oracle: HF logits of every position -> log_softmax -> label log-probs -> T-SPIN loss."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    tok = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * mask
    real, gen, proto = tok.sum(-1).chunk(3)
    return tspin_loss_from_logps(real, gen, proto, alpha=alpha, beta=beta)


def _check_against_full_logits(trainer, fused_grad_fn: bool = True):
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    # the loss runs in the LM head's forward, on the path tspin_kernels resolves (fused by default)
    assert ("FusedTupleLoss" in type(loss.grad_fn).__name__) == fused_grad_fn, type(loss.grad_fn).__name__
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad(set_to_none=True)
    ref = _full_logits_loss(trainer.model, batch, trainer.args.alpha, trainer.args.beta)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert grads
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    return batch


@pytest.mark.parametrize("fused", [None, False])
def test_loss_and_grads_equal_full_logits(tmp_path, fused):
    trainer = TSPINTrainer(tiny_model(TOK), args=_config(tmp_path, fused=fused),
                           train_dataset=Dataset.from_dict(triplet_rows(6)), processing_class=TOK)
    _check_against_full_logits(trainer, fused_grad_fn=fused is None)
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(examples)
    for k, key in enumerate(FIELDS):  # row 3k: labels are exactly example 0's completion tokens, EOS-terminated
        lab, ids = batch["labels"][3 * k], batch["input_ids"][3 * k]
        assert lab[lab != -100].tolist() == examples[0][f"{key}_ids"]
        assert examples[0][f"{key}_ids"][-1] == TOK.eos_token_id
        n = int(batch["attention_mask"][3 * k].sum())
        assert ids[:n].tolist() == examples[0]["prompt_ids"] + examples[0][f"{key}_ids"]


def test_lora_adapter_equals_full_logits(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    trainer = TSPINTrainer(tiny_model(TOK), args=_config(tmp_path), train_dataset=Dataset.from_dict(triplet_rows(6)),
                           processing_class=TOK, peft_config=lora)
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    _check_against_full_logits(trainer)


def test_conversational_triplets(tmp_path):
    tok = copy.deepcopy(TOK)
    tok.chat_template = CHAT
    rows = triplet_rows(6)
    data = {"prompt": [[{"role": "user", "content": p}] for p in rows["prompt"]]}
    for key in FIELDS:
        data[key] = [[{"role": "assistant", "content": c.strip()}] for c in rows[key]]
    trainer = TSPINTrainer(tiny_model(TOK), args=_config(tmp_path), train_dataset=Dataset.from_dict(data),
                           processing_class=tok)
    first = trainer.train_dataset[0]
    assert tok.decode(first["prompt_ids"]) == f"u:{rows['prompt'][0]}a:"
    assert tok.decode(first["real_ids"]) == rows["real"][0].strip() + "</s>"
    _check_against_full_logits(trainer)


def test_gradient_accumulation_is_exact(tmp_path):
    """4 triplets per step as 1 micro-batch of 4 or 2 of 2: the same weights after two SGD steps."""
    ds = Dataset.from_dict(triplet_rows(8))
    weights = {}
    for name, (bs, ga) in {"one": (4, 1), "two": (2, 2)}.items():
        model = tiny_model(TOK)
        args = _config(tmp_path / name, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=2)
        trainer = TSPINTrainer(model, args=args, train_dataset=ds, processing_class=TOK)
        trainer.train()
        weights[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = tiny_model(TOK).state_dict()
    for n, w in weights["one"].items():
        assert not torch.equal(w, start[n]), f"{n}: training did not change it"
        torch.testing.assert_close(weights["two"][n], w, rtol=1e-4, atol=1e-6, msg=lambda m, k=n: f"{k}: {m}")


def test_trains_on_a_tspin_iterate_file_and_logs_trl_metrics(tmp_path):
    rows = triplet_rows(6)
    path = tmp_path / "data.jsonl"  # the format `tspin iterate` writes per iteration
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", **{k: rows[k][i] for k in rows}}) + "\n"
                            for i in range(6)))
    ds = load_dataset("json", data_files=str(path), split="train")
    trainer = TSPINTrainer(tiny_model(TOK), args=_config(tmp_path / "out", max_steps=2, eval_strategy="steps",
                                                         eval_steps=2),
                           train_dataset=ds, eval_dataset=ds, processing_class=TOK)
    trainer.train()
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    eval_logs = [e for e in trainer.state.log_history if "eval_loss" in e]
    keys = {"logps/real", "logps/generated", "logps/proto", "rewards/real", "rewards/margins",
            "rewards/accuracies", "margins/current", "margins/history", "rewards/history_accuracies"}
    assert len(train_logs) == 2 and keys <= set(train_logs[0])
    assert eval_logs and {f"eval_{k}" for k in keys} <= set(eval_logs[0])
    e = train_logs[0]
    assert e["rewards/real"] == pytest.approx(1.5 * e["logps/real"], rel=1e-6)
    assert e["margins/current"] == pytest.approx(e["logps/real"] - e["logps/generated"], rel=1e-5, abs=1e-5)
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "config.json").exists()


def test_bad_input_names_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="expected columns prompt, real, generated, proto"):
        TSPINTrainer(tiny_model(TOK), args=_config(tmp_path), processing_class=TOK,
                     train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}))
    with pytest.raises(ValueError, match="beta: expected a finite number >= 0"):
        _config(tmp_path, beta=-1.0)
    with pytest.raises(ValueError, match="'real' and 'prompt' must both be strings or both be message lists"):
        data = {"prompt": ["ab?"], "real": [[{"role": "assistant", "content": "x"}]], "generated": ["y"],
                "proto": ["z"]}
        TSPINTrainer(tiny_model(TOK), args=_config(tmp_path), processing_class=TOK,
                     train_dataset=Dataset.from_dict(data))
