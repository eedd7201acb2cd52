"""Generation: batched HF generate with left padding, seeded sampling, resume after interruption, atomic output."""

import json

import pytest
import torch
from _trainer_helpers import one_thread, tiny_cfg, tiny_model_dir, tiny_policy  # noqa: F401 (one_thread: autouse)

from tspin.data import load_records
from tspin.experiments.demo import make_task
from tspin.generation import generate_field, generate_samples, generate_texts
from tspin.io import read_jsonl
from tspin.models import load_tokenizer
from tspin.settings import sampling

PROMPTS = [r["prompt"] for r in make_task(11, seed=5)]  # lengths differ: left padding matters


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    d = tiny_model_dir(tmp_path_factory.mktemp("g"), hidden=32, layers=2, heads=2, seed=1)
    model = tiny_policy(d)
    torch.manual_seed(0)
    with torch.no_grad():  # large random weights: answers depend strongly on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model, load_tokenizer(str(d))


def gen(mt, prompts, **kw):
    model, tok = mt
    opts = dict(template="paper", max_prompt_length=24, max_new_tokens=6, batch_size=4, progress=False)
    opts.update(kw)
    return generate_texts(model, tok, prompts, **opts)


def test_left_padded_batches_match_one_by_one_greedy(mt):
    batched = gen(mt, PROMPTS, temperature=0.0, batch_size=5)
    single = [gen(mt, [p], temperature=0.0, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1  # the prompts really lead to different answers


def test_sampling_is_seeded(mt):
    a = gen(mt, PROMPTS, temperature=1.0, seed=3)
    assert a == gen(mt, PROMPTS, temperature=1.0, seed=3)
    assert a != gen(mt, PROMPTS, temperature=1.0, seed=4)


def test_resume_after_interruption_keeps_done_batches_and_matches(mt, tmp_path):
    part = tmp_path / "out.jsonl.partial"
    full = gen(mt, PROMPTS, temperature=1.0, seed=7, partial_path=part)
    lines = part.read_text().splitlines()
    assert len(lines) == 3  # 11 prompts in batches of 4
    # a kill during the third write: two whole lines and a torn one survive
    first = json.loads(lines[0])
    first["text"] = ["KEPT"] * len(first["text"])
    part.write_text(json.dumps(first) + "\n" + lines[1] + "\n" + lines[2][:10])
    resumed = gen(mt, PROMPTS, temperature=1.0, seed=7, partial_path=part)
    kept = set(first["index"])
    assert all(t == "KEPT" for i, t in enumerate(resumed) if i in kept)  # batch 0 was not redone
    assert [t for i, t in enumerate(resumed) if i not in kept] == [t for i, t in enumerate(full) if i not in kept]
    # a partial file made with another batching is not trusted
    assert gen(mt, PROMPTS, temperature=1.0, seed=7, partial_path=part, batch_size=3) == \
        gen(mt, PROMPTS, temperature=1.0, seed=7, batch_size=3)


def test_generate_field_writes_atomically_and_caches(mt, tmp_path):
    model, tok = mt
    recs = [{"prompt_id": str(i), "prompt": p, "real": "x"} for i, p in enumerate(PROMPTS)]
    out = tmp_path / "proto.jsonl"
    cfg = tiny_cfg(generation_batch_size=4)
    rows = generate_field(model, tok, recs, out, "proto", sampling(cfg), seed=0)
    assert out.exists() and not (tmp_path / "proto.jsonl.partial").exists()
    assert [r["proto"] for r in load_records(out)] == [r["proto"] for r in rows]
    assert [p.name for p in tmp_path.iterdir()] == ["proto.jsonl"]  # no temp files left behind
    # cached: a second call reads the file and never touches the model
    assert generate_field(None, tok, recs, out, "proto", sampling(cfg), seed=0) == load_records(out)


def test_samples_record_truncation_and_token_counts(mt, tmp_path):
    """A sample cut at max_new_tokens is flagged and has max_new_tokens tokens; one that stopped counts its EOS,
    which its text does not hold. generate_field writes the flag next to the field; a partial file written without
    the flags (an older version) is sampled again, not trusted."""
    model, tok = mt
    kw = dict(template="paper", max_prompt_length=24, max_new_tokens=6, batch_size=4, temperature=1.0, seed=3,
              progress=False)
    samples = generate_samples(model, tok, PROMPTS * 3, **kw)
    assert {s.truncated for s in samples} == {True, False}  # both endings occur
    for s in samples:  # the text holds at most the tokens before the EOS (other special tokens are dropped)
        assert s.num_tokens == 6 if s.truncated else 1 <= s.num_tokens <= 6
        assert len(tok(s.text, add_special_tokens=False)["input_ids"]) <= s.num_tokens - (not s.truncated)
    assert [s.text for s in samples] == gen(mt, PROMPTS * 3, temperature=1.0, seed=3)

    recs = [{"prompt_id": str(i), "prompt": p, "real": "x"} for i, p in enumerate(PROMPTS * 3)]
    rows = generate_field(model, tok, recs, tmp_path / "g.jsonl", "generated",
                          sampling(tiny_cfg(generation_batch_size=4)), seed=3)
    written = read_jsonl(tmp_path / "g.jsonl")
    assert [r["generated_truncated"] for r in written] == [r["generated_truncated"] for r in rows]
    assert [r["generated_truncated"] for r in written] == [s.truncated for s in samples]

    part = tmp_path / "old.partial"
    generate_samples(model, tok, PROMPTS * 3, partial_path=part, **kw)
    old = [{k: v for k, v in json.loads(x).items() if k in ("batch", "index", "text")}
           for x in part.read_text().splitlines()]
    old[0]["text"] = ["OLD"] * len(old[0]["text"])
    part.write_text("".join(json.dumps(x) + "\n" for x in old))
    assert generate_samples(model, tok, PROMPTS * 3, partial_path=part, **kw) == samples
    assert all("truncated" in json.loads(x) for x in part.read_text().splitlines())
