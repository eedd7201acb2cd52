"""One T-SPIN trainer stack: TSPINTrainer (the Hugging Face Trainer / TRL integration) and `tspin` tokenize, collate
and log through tspin_kernels.integrations.triplets, so the same records give the same rows, token for token:
written responses tokenized with their prompt (a SentencePiece-style tokenizer merges the prompt's last space into
the response), sampled responses on their ids as sampled, truncated samples without EOS, one EOS only, prompts cut
from the left and responses from the right."""

from __future__ import annotations

import copy

import pytest
import torch
from _trainer_helpers import metaspace_tokenizer
from datasets import Dataset

from tests._trl_tiny import char_tokenizer, one_thread, tiny_model  # noqa: F401 (fixture)
from tspin.batch import collate
from tspin.data import build_features, format_prompt
from tspin.experiments.demo import make_task
from tspin_kernels.integrations.triplets import IGNORE_INDEX, spin_metrics, tspin_metrics
from tspin_kernels.integrations.tspin_trainer import (
    FIELDS,
    TripletCollator,
    TSPINConfig,
    TSPINTrainer,
    tokenize_triplet,
)

TOK = metaspace_tokenizer()


def _records(n: int = 6) -> list[dict]:
    """tspin records with every kind of response: written text (real; proto), sampled ids that stopped at EOS, a
    sample cut at max_new_tokens (no EOS), and a written text that already ends with the EOS token."""
    out = []
    for i, r in enumerate(make_task(n, 5)):
        sampled = TOK(" " + r["response"][::-1], add_special_tokens=False)["input_ids"]
        truncated = i % 3 == 1
        rec = {"prompt_id": str(i), "prompt": r["prompt"], "real": r["response"],
               "generated": TOK.decode(sampled), "generated_ids": sampled + ([] if truncated else [TOK.eos_token_id]),
               "generated_truncated": truncated, "proto": r["response"][1:]}
        if i == 2:
            rec["real"] += TOK.eos_token  # a file whose references already carry the EOS text
        out.append(rec)
    return out


def _trainer_rows(records: list[dict], max_length: int, max_prompt_length: int | None) -> dict[str, torch.Tensor]:
    """What TSPINTrainer trains on: the records as a TRL dataset (the prompt as the text the model reads)."""
    examples = [tokenize_triplet({**r, "prompt": format_prompt(TOK, r["prompt"], "paper")}, TOK,
                                 max_length=max_length, max_prompt_length=max_prompt_length) for r in records]
    return TripletCollator(TOK.pad_token_id, max_length)(examples)


@pytest.mark.parametrize("max_length, max_prompt_length", [(96, None), (9, 6)])
def test_the_trainer_builds_tspins_rows(max_length, max_prompt_length):
    records = _records()
    feats = build_features(records, TOK, FIELDS, template="paper", max_length=max_length,
                           max_prompt_length=max_prompt_length or max_length - 1)
    ours = collate(feats, FIELDS, TOK.pad_token_id)
    theirs = _trainer_rows(records, max_length, max_prompt_length)
    assert torch.equal(theirs["input_ids"], ours.input_ids)
    assert torch.equal(theirs["labels"], ours.labels)
    assert torch.equal(theirs["attention_mask"], ours.attention_mask)
    # the cases the records are there for
    n, eos = len(records), TOK.eos_token_id
    real_2 = ours.labels[2][ours.labels[2] != IGNORE_INDEX].tolist()
    gen_1 = ours.labels[n + 1][ours.labels[n + 1] != IGNORE_INDEX].tolist()
    if max_prompt_length is None:
        assert real_2[-1] == eos and real_2[-2] != eos  # one EOS, though the text ended with it
        assert gen_1 == records[1]["generated_ids"] and eos not in gen_1  # cut sample: its ids, no EOS
        p = TOK(format_prompt(TOK, records[0]["prompt"], "paper"))["input_ids"]
        # the merge that makes the rows' prompts differ: "Response: " + "x" -> "▁x" in the written rows, the whole
        # prompt (its last "▁") before the sampled ids
        assert ours.input_ids[n, : len(p)].tolist() == p and ours.input_ids[0, : len(p)].tolist() != p
    else:  # every prompt cut to its last 6 tokens, and every response cut to fit 9
        assert all(int((lab[:7] == IGNORE_INDEX).sum()) == 6 for lab in ours.labels)
        assert ours.attention_mask.sum(1).tolist() == [max_length] * len(ours.labels)


def test_the_trainer_reads_sampled_ids_from_a_dataset(tmp_path):
    """Through the Trainer's own dataset.map: the sampled-ids columns reach the tokenizer, rows with and without
    them side by side."""
    records = [{**r, "prompt": format_prompt(TOK, r["prompt"], "paper")} for r in _records(4)]
    for r in records[2:]:  # rows with the sampled ids first, then rows without (datasets reads the columns)
        del r["generated_ids"], r["generated_truncated"]
    ds = Dataset.from_list(records)
    args = TSPINConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=96, save_strategy="no")
    trainer = TSPINTrainer(tiny_model(TOK), args=args, train_dataset=ds, processing_class=TOK)
    for i, r in enumerate(records):
        clean = {k: v for k, v in r.items() if v is not None}
        assert trainer.train_dataset[i] == tokenize_triplet(clean, TOK, max_length=96)
    assert trainer.train_dataset[1]["generated_ids"][-len(records[1]["generated_ids"]):] == records[1]["generated_ids"]


def test_conversational_completions_are_one_assistant_message(tmp_path):
    tok = copy.deepcopy(char_tokenizer())
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% if m['role'] == 'assistant' "
                         "%}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
    one = [{"role": "assistant", "content": "yes"}]
    ex = {"prompt": [{"role": "system", "content": "be"}, {"role": "user", "content": "ok?"}], "real": one,
          "generated": [{"role": "assistant", "content": "no"}], "proto": one}
    out = tokenize_triplet(ex, tok)
    assert tok.decode(out["prompt_ids"]) == "s:beu:ok?a:" and tok.decode(out["real_ids"]) == "yes</s>"
    with pytest.raises(ValueError, match="'generated': expected one assistant message"):
        tokenize_triplet({**ex, "generated": one + [{"role": "user", "content": "and?"}]}, tok)
    with pytest.raises(ValueError, match="'proto': expected one assistant message"):
        tokenize_triplet({**ex, "proto": {"role": "assistant", "content": "x"}}, tok)


def test_max_prompt_length_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"max_prompt_length: expected an int >= 1 below max_length \(16\)"):
        TSPINConfig(output_dir=str(tmp_path), max_length=16, max_prompt_length=16)
    assert TSPINConfig(output_dir=str(tmp_path), max_length=None, max_prompt_length=512).max_prompt_length == 512


def test_the_metrics_are_trls_names_of_the_rows_logps():
    real, gen, proto = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -3.0]), torch.tensor([-5.0, -1.0])
    m = {k: v.item() for k, v in tspin_metrics(real, gen, proto, alpha=0.5).items()}
    assert m == pytest.approx({
        "logps/real": -2.5, "logps/generated": -2.5, "logps/proto": -3.0, "rewards/real": -1.25,
        "rewards/generated": -1.25, "rewards/proto": -1.5, "rewards/margins": 0.0, "rewards/accuracies": 0.5,
        "margins/current": 0.0, "margins/history": 0.5, "rewards/history_accuracies": 0.5})
    assert "logps/proto" not in tspin_metrics(real, gen, alpha=1.0)  # without the history term: pairs
    s = {k: v.item() for k, v in spin_metrics(real, gen, torch.zeros(2), torch.tensor([-2.0, -2.0]),
                                              beta=0.1).items()}
    assert s["rewards/margins"] == pytest.approx(0.1 * (-2.5 - (-0.5)))
    assert s["rewards/accuracies"] == 0.0 and s["margins/current"] == 0.0
