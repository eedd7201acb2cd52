"""Exact match over an answer's content (Config.eval_answer_pattern): the demo task's annotators join the steps
with one of three separators, and exact match scores the steps whatever the separator; the literal y' = y (where
self-play's gradient vanishes) still tells the separators apart."""

import re

import pytest
from _trainer_helpers import one_thread, tiny_model_dir, write_jsonl  # noqa: F401 (one_thread: autouse)

from tspin.data import load_records
from tspin.evaluation import answer_key, evaluate
from tspin.experiments.collect import normalized_edit_distance
from tspin.experiments.demo import DEMO_SETTINGS
from tspin.experiments.runs import _match_rate, demo_config
from tspin.experiments.task import ANSWER_PATTERN, OPS, SEPARATORS, make_chain_splits
from tspin.io import read_jsonl
from tspin.models import load_policy, load_tokenizer
from tspin.settings import evaluation, load_settings


def test_each_annotation_joins_its_steps_with_one_drawn_separator():
    splits = make_chain_splits(300, 20, 20, seed=3, **DEMO_SETTINGS["task"])
    used = {}
    for rows in splits.values():
        for r in rows:
            *ops, s = r["prompt"].split()
            seps = {sep for sep in SEPARATORS if sep in r["response"]}
            assert len(seps) == 1, r  # one separator per answer, not mixed
            sep = seps.pop()
            steps = r["response"].split(sep)
            for op, step in zip(ops, steps, strict=True):
                s = OPS[op](s)
                assert step == s
            used[sep] = used.get(sep, 0) + 1
    assert set(used) == set(SEPARATORS) and min(used.values()) > 60  # all three, about a third each


def test_one_separator_draws_nothing_so_earlier_designs_keep_their_prompts():
    one = make_chain_splits(50, 5, 5, seed=0, min_len=8, max_len=10, min_steps=3, max_steps=3)
    three = make_chain_splits(50, 5, 5, seed=0, min_len=8, max_len=10, min_steps=3, max_steps=3,
                              separators=SEPARATORS)
    assert all(" > " in r["response"] and "->" not in r["response"] for r in one["train"])
    assert [r["prompt"] for r in one["train"]][:1] == [r["prompt"] for r in three["train"]][:1]
    assert one["train"][0]["response"].split(" > ") == re.findall(ANSWER_PATTERN, three["train"][0]["response"])


@pytest.mark.parametrize(("answer", "same"), [
    ("abc -> def | ghi", True), ("abc > def > ghi", True), ("abc | def  ->  ghi", True),
    ("abc > def > gih", False), ("abc > def", False), ("abc > def > ghi > a", False),
    ("abc > def) > ghi", False), ("abc > reverse def > ghi", False), ("abc:def > ghi", False),
])
def test_the_demo_pattern_scores_the_steps_not_the_separator(answer, same):
    real = "abc > def > ghi"
    assert (answer_key(answer, ANSWER_PATTERN) == answer_key(real, ANSWER_PATTERN)) is same
    assert answer_key("ab  c\n", None) == "ab c"  # no pattern: the whole text, whitespace runs collapsed
    assert (normalized_edit_distance(answer, real) == 0.0) is same
    # y' = y stays literal: the same steps with another separator are another sample
    assert _match_rate([{"generated": "abc -> def -> ghi", "real": real}], "generated") == 0.0


def test_evaluate_counts_a_greedy_answer_with_another_separator_as_exact(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    tok = load_tokenizer(str(model))
    prompts = [{"prompt_id": str(i), "prompt": p, "response": "x"} for i, p in enumerate(["sort abc", "shift pon"])]
    cfg = demo_config(model_name_or_path=str(model), max_new_tokens=6, eval_max_new_tokens=6)
    policy = load_policy(load_settings(cfg))
    records = load_records(write_jsonl(tmp_path / "held.jsonl", prompts))
    evaluate(policy, tok, records, **evaluation(cfg), out_path=tmp_path / "greedy.jsonl")
    greedy = [r["greedy"] for r in read_jsonl(tmp_path / "greedy.jsonl")]
    # the references: each greedy answer with a separator appended, the same steps under the pattern
    rows = [{**p, "response": g + " -> "} for p, g in zip(prompts, greedy)]
    records = load_records(write_jsonl(tmp_path / "held2.jsonl", rows))
    assert evaluate(policy, tok, records, **evaluation(cfg))["eval/exact_match"] == 1.0
    literal = demo_config(model_name_or_path=str(model), max_new_tokens=6, eval_max_new_tokens=6,
                          eval_answer_pattern=None)
    assert evaluate(policy, tok, records, **evaluation(literal))["eval/exact_match"] == 0.0
    assert evaluation(cfg)["answer_pattern"] == ANSWER_PATTERN
