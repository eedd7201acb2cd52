"""What the method needs from the loop at paper scale, checked where a shortcut would go wrong: dropout off while
training (log-probs equal to eval mode's), T-SPIN without history needs no proto, tokenization of the triplet's
rows, stop tokens and truncated samples."""

import pytest
import torch
from _trainer_helpers import (  # noqa: F401 (one_thread: autouse)
    metaspace_tokenizer,
    one_thread,
    task_file,
    tiny_cfg,
    tiny_model_dir,
    tiny_policy,
)

from tspin.batch import collate
from tspin.data import build_features, load_records
from tspin.experiments.demo import build_tokenizer, make_task
from tspin.losses import policy_logps
from tspin.settings import sampling


def _phi_dir(path, *, module_dropout: float, attention_dropout: float):
    """A tiny Phi: its residual and embedding dropouts are nn.Dropout modules, its attention dropout a float rate
    the attention module hands to sdpa while training (what TRL's disable_dropout_in_model does not reach)."""
    from transformers import PhiConfig, PhiForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=64, resid_pdrop=module_dropout,
                                     embd_pdrop=module_dropout, attention_dropout=attention_dropout,
                                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("module_dropout,attention_dropout", [(0.5, 0.0), (0.0, 0.5)], ids=["modules", "attention"])
def test_dropout_is_off_while_training_unless_asked(tmp_path, module_dropout, attention_dropout):
    path = _phi_dir(tmp_path / "phi", module_dropout=module_dropout, attention_dropout=attention_dropout)
    tok = build_tokenizer()
    rows = [{"prompt_id": str(i), "prompt": r["prompt"], "real": r["response"]} for i, r in enumerate(make_task(6, 3))]
    batch = collate(build_features(rows, tok, ("real",), template="paper", max_length=40, max_prompt_length=24),
                    ("real",), tok.pad_token_id)
    for disable in (True, False):
        policy = tiny_policy(path, disable_dropout=disable)
        policy.train()
        with torch.no_grad():
            first, second = policy_logps(policy, batch), policy_logps(policy, batch)
            policy.eval()
            evaluated = policy_logps(policy, batch)
        if disable:  # training sees the log-probs that generation, evaluation and SPIN's references see
            torch.testing.assert_close(first, evaluated)
            torch.testing.assert_close(second, evaluated)
        else:
            assert not torch.allclose(first, second)
    assert policy.model.config.resid_pdrop == module_dropout  # the saved config keeps the model's rates


def test_tspin_without_history_runs_without_proto(tmp_path):
    """no_history with reuse_proto_at_iter0=false: iteration 0 samples its own y', nothing needs y0, so none is
    sampled and the examples are pairs (it used to stop with 'records lack field proto')."""
    import json

    from tspin.io import read_jsonl
    from tspin.selfplay import iterate

    model = tiny_model_dir(tmp_path / "m")
    data = task_file(tmp_path / "d.jsonl", 12)
    out = tmp_path / "run"
    cfg = tiny_cfg(model_name_or_path=str(model), data_path=str(data), method="tspin", no_history=True,
                   reuse_proto_at_iter0=False, num_iterations=2, output_dir=str(out))
    iterate(cfg)
    assert not (out / "proto.jsonl").exists()
    for t in range(2):
        rows = read_jsonl(out / f"iter{t}" / "data.jsonl")
        assert rows and all("generated" in r and "proto" not in r for r in rows)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r.get("phase") == "train"]
    assert train and all("logps/generated" in r and "logps/proto" not in r and r["beta"] == 0 for r in train)


@pytest.mark.parametrize("fused", [False, True])  # log-probs with their own backward, and the fused path
def test_tspin_no_history_on_pairs_equals_triplets_with_beta_zero(tmp_path, fused):
    """T-SPIN without the history term is a loss of its own over pairs [real; generated]: the same loss, gradients
    and current-term metrics as T-SPIN with beta = 0 over the triplets, without the proto rows."""
    from tspin.losses import compute_loss

    tok = build_tokenizer()
    rows = [{"prompt_id": str(i), "prompt": r["prompt"], "real": r["response"], "generated": r["response"][1:],
             "proto": r["response"][::-1]} for i, r in enumerate(make_task(5, 3))]
    policy = tiny_policy(tiny_model_dir(tmp_path / "m"))
    results = []
    for method, fields in (("tspin_no_history", ("real", "generated")), ("tspin", ("real", "generated", "proto"))):
        feats = build_features(rows, tok, fields, template="paper", max_length=40, max_prompt_length=24)
        policy.zero_grad()
        loss, metrics = compute_loss(policy, collate(feats, fields, tok.pad_token_id), method=method, alpha=0.5,
                                     beta=0.0, fused=fused)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in policy.parameters()], metrics))
    (pair_loss, pair_grads, pair_metrics), (trip_loss, trip_grads, trip_metrics) = results
    torch.testing.assert_close(pair_loss, trip_loss)
    for a, b in zip(pair_grads, trip_grads):
        torch.testing.assert_close(a, b)
    assert set(trip_metrics) - set(pair_metrics) == {"logps/proto", "rewards/proto", "margins/history",
                                                      "rewards/history_accuracies"}
    feats = build_features(rows, tok, ("real", "generated"), template="paper", max_length=40, max_prompt_length=24)
    with pytest.raises(ValueError, match="method='tspin' needs 3 rows per example.*method='tspin_no_history'"):
        compute_loss(policy, collate(feats, ("real", "generated"), tok.pad_token_id), method="tspin", beta=0.1)


# ----------------------------------------------------------------------------- tokenization of the triplet rows
def test_real_is_tokenized_with_its_prompt(tmp_path):
    from tspin.data import IGNORE_INDEX, format_prompt

    tok = metaspace_tokenizer()
    rec = {"prompt_id": "0", "prompt": "reverse abcd", "real": "dcba"}
    (f,) = build_features([rec], tok, ("real",), template="paper", max_length=64, max_prompt_length=48)
    ids, labels = f["real"]
    text = format_prompt(tok, "reverse abcd", "paper")
    joint = tok(text + "dcba")["input_ids"]
    alone = tok(text)["input_ids"] + tok("dcba", add_special_tokens=False)["input_ids"]
    assert joint != alone  # what joining separately tokenized parts used to train on
    assert ids == joint + [tok.eos_token_id]
    response = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(response, skip_special_tokens=True) == "dcba" and response[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(response[0]).startswith("▁")  # the prompt's space went with the answer


def test_sampled_responses_train_on_the_sampled_token_ids(tmp_path):
    """y' and y0 keep the ids the policy sampled (after the prompt ids it saw): decoding them and tokenizing the
    text again gives other ids with a SentencePiece tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tspin.data import encode_prompts
    from tspin.generation import generate_field

    tok = metaspace_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = tiny_cfg(model_name_or_path=str(tmp_path / "m"), max_new_tokens=6, max_length=64, max_prompt_length=48)
    recs = [{"prompt_id": str(i), "prompt": r["prompt"], "real": r["response"]} for i, r in enumerate(make_task(16, 2))]
    rows = generate_field(tiny_policy(tmp_path / "m"), tok, recs, tmp_path / "gen.jsonl", "generated", sampling(cfg),
                          seed=0)
    assert rows == load_records(tmp_path / "gen.jsonl")  # ids and truncation flags are kept in the file
    feats = build_features(rows, tok, ("generated",), template="paper", max_length=64, max_prompt_length=48)
    prompts = encode_prompts(tok, [r["prompt"] for r in rows], "paper", 48)
    retokenized = 0
    for r, f, p in zip(rows, feats, prompts):
        assert f["generated"][0] == p + r["generated_ids"]  # exactly what was sampled, nothing appended
        assert r["generated_truncated"] == (tok.eos_token_id not in r["generated_ids"])
        retokenized += tok(r["generated"], add_special_tokens=False)["input_ids"] != [
            t for t in r["generated_ids"] if t != tok.eos_token_id]
    assert retokenized > 0  # re-tokenizing the decoded text would have trained on other ids


# ----------------------------------------------------------------------------- stop tokens and truncated samples
def test_generation_stops_at_every_stop_token_of_the_model(tmp_path):
    from tspin.generation import generate_samples
    from tspin.wrapping import policy_of

    tok = build_tokenizer()
    policy = tiny_policy(tiny_model_dir(tmp_path / "m"))
    opts = dict(template="paper", max_prompt_length=24, max_new_tokens=4, temperature=0.0, progress=False)
    prompts = [r["prompt"] for r in make_task(8, 1)]
    first = [s.token_ids[0] for s in generate_samples(policy, tok, prompts, **opts)]
    i, x = next((i, x) for i, x in enumerate(first) if x != tok.eos_token_id)
    # a second stop id in the model's generation config (Llama-3 lists <|end_of_text|> and <|eot_id|>)
    policy_of(policy).model.generation_config.eos_token_id = [tok.eos_token_id, x]
    s = generate_samples(policy, tok, [prompts[i]], **opts)[0]
    assert s.token_ids == [x] and not s.truncated and s.text == ""


def _chat_tokenizer():
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}#{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}:{% endif %}")
    return tok


def test_chat_template_end_of_turn_ends_and_stops_responses():
    from tspin.data import end_of_turn_id, stop_token_ids

    tok = _chat_tokenizer()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok, "chat") == eot and end_of_turn_id(tok, "paper") == tok.eos_token_id
    assert set(stop_token_ids(tok, "chat")) == {tok.eos_token_id, eot}
    assert stop_token_ids(tok, "paper") == [tok.eos_token_id]

    class GenerationConfig:
        eos_token_id = [7, tok.eos_token_id]

    assert stop_token_ids(tok, "chat", GenerationConfig()) == [7, tok.eos_token_id, eot]
    rec = {"prompt_id": "0", "prompt": "sort ba", "real": "ab"}
    (f,) = build_features([rec], tok, ("real",), template="chat", max_length=40, max_prompt_length=24)
    assert f["real"][0][-1] == eot  # the reference ends the way the template ends an assistant turn


@pytest.mark.parametrize("option", ["keep_without_eos", "append_eos", "drop"])
def test_truncated_samples_option(tmp_path, option):
    from tspin.generation import generate_samples
    from tspin.selfplay import _features

    tok = build_tokenizer()
    eos = tok.eos_token_id
    policy = tiny_policy(tiny_model_dir(tmp_path / "m"))
    tasks = make_task(6, 4)
    samples = generate_samples(policy, tok, [r["prompt"] for r in tasks], template="paper", max_prompt_length=24,
                               max_new_tokens=2, temperature=1.0, progress=False)
    assert any(s.truncated for s in samples)  # a random model rarely says EOS within two tokens
    for s in samples:
        assert s.truncated == (eos not in s.token_ids) and (len(s.token_ids) == 2 or not s.truncated)
    rows = [{"prompt_id": str(i), "prompt": r["prompt"], "real": r["response"], "generated": s.text,
             "generated_ids": s.token_ids, "generated_truncated": s.truncated, "proto": r["response"][:1]}
            for i, (r, s) in enumerate(zip(tasks, samples))]
    finished = tok(rows[0]["real"], add_special_tokens=False)["input_ids"] + [eos]  # a sample that stopped
    rows[0].update(generated=rows[0]["real"], generated_ids=finished, generated_truncated=False)
    cfg = tiny_cfg(model_name_or_path=str(tmp_path / "m"), method="tspin", truncated_samples=option)
    feats = _features(rows, tok, cfg)
    kept = [r for r in rows if not (option == "drop" and r["generated_truncated"])]
    assert [f["prompt_id"] for f in feats] == [r["prompt_id"] for r in kept]
    for f, r in zip(feats, kept):
        response = [t for t in f["generated"][1] if t != -100]
        if r["generated_truncated"] and option == "append_eos":
            assert response == r["generated_ids"] + [eos]
        else:  # cut samples keep exactly their tokens: no EOS as if they had finished
            assert response == r["generated_ids"]
        assert [t for t in f["proto"][1] if t != -100][-1] == eos  # a text-only sample that finished ends with EOS
    if option == "drop":
        with pytest.raises(ValueError, match="every sample was cut"):
            _features([r for r in rows if r["generated_truncated"]], tok, cfg)
