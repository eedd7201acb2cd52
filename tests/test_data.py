"""Data: every accepted format through `datasets`, malformed-record errors, subsets, tokenization, collation."""

import json

import pytest
import torch
from _trainer_helpers import one_thread, write_jsonl  # noqa: F401 (one_thread: autouse fixture)

from tspin.batch import collate
from tspin.data import (
    IGNORE_INDEX,
    PAPER_TEMPLATE,
    DataError,
    build_features,
    format_prompt,
    load_records,
    select_subset,
    split_heldout,
)
from tspin.experiments.demo import build_tokenizer

# a hard dependency (always there in CI); the GPU image lacks it, and `make test-gpu` must still collect this file
datasets = pytest.importorskip("datasets", reason="tspin.data needs the `datasets` package")

PAIRS = [{"prompt": f"reverse ab{c}", "response": f"{c}ba"} for c in "cdefgh"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _expect(records):
    return [(r["prompt"], r["real"]) for r in records]


# ----------------------------------------------------------------------------- formats
def test_jsonl_json_parquet_and_dataset_dir_agree(tmp_path):
    want = [(p["prompt"], p["response"]) for p in PAIRS]
    jl = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    js = tmp_path / "d.json"
    js.write_text(json.dumps(PAIRS))
    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_list(PAIRS).to_parquet(str(pq))
    dd = tmp_path / "dsdir"
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(dd))
    single = tmp_path / "single"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(single))
    assert _expect(load_records(jl)) == want
    assert _expect(load_records(js)) == want
    assert _expect(load_records(pq)) == want
    assert _expect(load_records(dd, split="train_sft")) == want
    assert _expect(load_records(single)) == want
    for i in range(2):  # sharded parquet, as UltraChat-200k ships it
        datasets.Dataset.from_list(PAIRS[3 * i:3 * i + 3]).to_parquet(str(tmp_path / f"train-{i}.parquet"))
    assert _expect(load_records(tmp_path / "train-*.parquet")) == want
    with pytest.raises(DataError, match="save_to_disk"):
        load_records(tmp_path)
    with pytest.raises(DataError, match="split 'train' not found"):
        load_records(dd, split="train")


def test_chat_first_turn_and_real_key_and_generated_files(tmp_path):
    chat = [{"prompt_id": "u1", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
        {"role": "assistant", "content": "second"}]}]
    r = load_records(write_jsonl(tmp_path / "c.jsonl", chat))
    assert r == [{"prompt_id": "u1", "prompt": "hi", "real": "hello"}]
    gen = [{"prompt_id": "7", "prompt": "p", "real": "y", "generated": "g", "proto": "z"}]
    r = load_records(write_jsonl(tmp_path / "g.jsonl", gen))
    assert r == [{"prompt_id": "7", "prompt": "p", "real": "y", "generated": "g", "proto": "z"}]
    r = load_records(write_jsonl(tmp_path / "n.jsonl", [{"prompt": "p", "response": "y"}] * 2))
    assert [x["prompt_id"] for x in r] == ["00000000", "00000001"]


# ----------------------------------------------------------------------------- malformed records
def test_invalid_json_line_is_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: invalid JSON"):
        load_records(p)


def test_missing_field_names_file_line_and_field(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match=r"m\.jsonl: line 2: missing field 'response \(or real\)'"):
        load_records(p)
    p = write_jsonl(tmp_path / "np.jsonl", [{"prompt": "a", "response": "b"}, {"response": "c", "prompt": None}])
    with pytest.raises(DataError, match=r"np\.jsonl: line 2: missing field 'prompt'"):
        load_records(p)


def test_wrong_type_and_bad_chat_are_named(tmp_path):
    js = tmp_path / "t.json"
    js.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": ["x"]}]))
    with pytest.raises(DataError, match=r"t\.json: record 1: .*'response"):
        load_records(js)
    chat = [{"messages": [{"role": "assistant", "content": "x"}]}]
    with pytest.raises(DataError, match=r"c\.jsonl: line 1: field 'messages' has no 'user' turn"):
        load_records(write_jsonl(tmp_path / "c.jsonl", chat))
    chat = [{"messages": [{"role": "user", "content": "x"}]}]
    with pytest.raises(DataError, match=r"c2\.jsonl: line 1: missing field 'messages' assistant reply"):
        load_records(write_jsonl(tmp_path / "c2.jsonl", chat))


def test_parquet_missing_field_names_row(tmp_path):
    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}]).to_parquet(
        str(pq))
    with pytest.raises(DataError, match=r"d\.parquet: row 1: missing field 'response"):
        load_records(pq)


def test_unknown_suffix_and_missing_file(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,response\n")
    with pytest.raises(DataError, match="unsupported data file type '.csv'"):
        load_records(p)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- subsets
def test_seeded_subset_fraction_count_nested():
    recs = [{"prompt_id": str(i)} for i in range(100)]
    a = select_subset(recs, fraction=0.25, seed=3)
    assert len(a) == 25 and a == select_subset(recs, fraction=0.25, seed=3)
    assert a != select_subset(recs, fraction=0.25, seed=4)
    assert [r["prompt_id"] for r in a] == sorted((r["prompt_id"] for r in a), key=int)  # file order kept
    half = select_subset(recs, fraction=0.5, seed=3)
    assert {r["prompt_id"] for r in a} <= {r["prompt_id"] for r in half}
    assert len(select_subset(recs, count=7, seed=0)) == 7
    with pytest.raises(ValueError, match="data_count=200"):
        select_subset(recs, count=200)
    train, held = split_heldout(recs, 10, seed=0)
    assert len(held) == 10 and not {r["prompt_id"] for r in held} & {r["prompt_id"] for r in train}


# ----------------------------------------------------------------------------- tokenization
def test_prompt_templates(tok):
    assert format_prompt(tok, "sort ba", "paper") == PAPER_TEMPLATE.format(prompt="sort ba")
    assert format_prompt(tok, "x", "Q: {prompt} A:") == "Q: x A:"
    with pytest.raises(ValueError, match="no chat_template"):
        format_prompt(tok, "x", "chat")
    tok2 = build_tokenizer()
    tok2.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert format_prompt(tok2, "sort ba", "chat") == "<s>[sort ba]"


def test_labels_mask_prompt_and_truncation_rules(tok):
    rec = {"prompt_id": "0", "prompt": "reverse abcd", "real": "dcba"}
    (f,) = build_features([rec], tok, ("real",), template="paper", max_length=40, max_prompt_length=24)
    ids, labels = f["real"]
    prompt = tok(PAPER_TEMPLATE.format(prompt="reverse abcd"))["input_ids"]
    resp = tok("dcba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert prompt[0] == tok.bos_token_id
    assert ids == prompt + resp
    assert labels == [IGNORE_INDEX] * len(prompt) + resp
    # a long prompt keeps its last tokens; the response is cut at the end and loses EOS
    (g,) = build_features([rec], tok, ("real",), template="paper", max_length=len(prompt) + 1, max_prompt_length=4)
    ids, labels = g["real"]
    assert ids[:4] == prompt[-4:] and len(ids) == 4 + len(resp)
    (h,) = build_features([rec], tok, ("real",), template="paper", max_length=len(prompt) + 2,
                          max_prompt_length=len(prompt))
    assert h["real"][0] == prompt + resp[:2] and tok.eos_token_id not in h["real"][0][len(prompt):]


# ----------------------------------------------------------------------------- collation
def _triplet_feats(tok):
    recs = [{"prompt_id": "a", "prompt": "sort cab", "real": "abc", "generated": "ab", "proto": "abcc"},
            {"prompt_id": "b", "prompt": "rotate ponm", "real": "onmp", "generated": "x", "proto": ""}]
    return build_features(recs, tok, ("real", "generated", "proto"), template="paper", max_length=40,
                          max_prompt_length=24)


def test_padded_collation_token_by_token(tok):
    feats = _triplet_feats(tok)
    fields = ("real", "generated", "proto")
    b = collate(feats, fields, tok.pad_token_id, "padded")
    order = [feats[0]["real"], feats[1]["real"], feats[0]["generated"], feats[1]["generated"],
             feats[0]["proto"], feats[1]["proto"]]
    T = max(len(s) for s, _ in order)
    assert b.input_ids.shape == (6, T) and b.num_examples == 2
    for r, (ids, lab) in enumerate(order):
        n = len(ids)
        assert b.input_ids[r, :n].tolist() == ids and b.labels[r, :n].tolist() == lab
        assert (b.input_ids[r, n:] == tok.pad_token_id).all() and (b.labels[r, n:] == IGNORE_INDEX).all()
        assert b.attention_mask[r].tolist() == [1] * n + [0] * (T - n)
    assert b.num_tokens == sum(sum(x != IGNORE_INDEX for x in lab) for _, lab in order)
    assert b.num_input_tokens == int(b.attention_mask.sum()) == sum(len(ids) for ids, _ in order)


def test_packed_collation_token_by_token(tok):
    feats = _triplet_feats(tok)
    for f, v in zip(feats, (1.5, -2.0)):
        f["ref"] = {"real": v, "generated": v - 1, "proto": v - 2}
    fields = ("real", "generated", "proto")
    b = collate(feats, fields, tok.pad_token_id, "packed")
    order = [feats[i][f] for f in fields for i in (0, 1)]
    assert b.attention_mask is None and b.input_ids.shape == (1, sum(len(s) for s, _ in order))
    assert b.cu_seqlens.dtype == torch.int32
    cu = b.cu_seqlens.tolist()
    assert cu[0] == 0 and len(cu) == 7
    for r, (ids, lab) in enumerate(order):
        assert b.input_ids[0, cu[r]:cu[r + 1]].tolist() == ids
        assert b.labels[0, cu[r]:cu[r + 1]].tolist() == lab
        assert b.position_ids[0, cu[r]:cu[r + 1]].tolist() == list(range(len(ids)))
    assert b.ref_logps.tolist() == [1.5, -2.0, 0.5, -3.0, -0.5, -4.0]


def test_missing_field_for_features_is_named(tok):
    with pytest.raises(DataError, match="records lack field 'proto'"):
        build_features([{"prompt_id": "a", "prompt": "p", "real": "r"}], tok, ("real", "proto"), template="paper",
                       max_length=40, max_prompt_length=24)


def test_collate_checks_token_ids_against_the_vocabulary(tok):
    """Checked on the CPU lists, so that the kernels need not read device values to do it."""
    feats = _triplet_feats(tok)
    fields = ("real", "generated", "proto")
    V = len(tok)
    assert collate(feats, fields, tok.pad_token_id, vocab_size=V).num_examples == 2
    bad = [dict(f) for f in feats]
    ids, labels = bad[1]["generated"]
    bad[1]["generated"] = (ids, labels[:-1] + [V])  # a label one past the vocabulary
    with pytest.raises(ValueError, match=rf"row 3 holds token id {V} outside \[0, {V}\)"):
        collate(bad, fields, tok.pad_token_id, "packed", vocab_size=V)
    bad[1]["generated"] = ([-5] + ids[1:], labels)
    with pytest.raises(ValueError, match="row 3 holds token id -5"):
        collate(bad, fields, tok.pad_token_id, vocab_size=V)
    bad[1]["generated"] = (ids, labels[:-1])
    with pytest.raises(ValueError, match="row 3 has .* input ids and .* labels"):
        collate(bad, fields, tok.pad_token_id)
    with pytest.raises(ValueError, match="pad_token_id: 99 is outside"):
        collate(feats, fields, 99, vocab_size=V)
    with pytest.raises(ValueError, match="layout='ragged'"):
        collate(feats, fields, tok.pad_token_id, "ragged")
