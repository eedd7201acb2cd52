"""`layout: shared_prefix` in the trainer: T-SPIN and SPIN train exactly like the padded layout (plain, with
gradient checkpointing and LoRA), SPIN's reference log-probs and the evaluation log-probs agree, `tspin iterate`
runs end to end, and SFT falls back to packed."""

import pytest
import torch
from _trainer_helpers import (  # noqa: F401 (one_thread: autouse)
    assert_trains_alike,
    one_thread,
    task_file,
    tiny_cfg,
    tiny_model_dir,
    tiny_policy,
)

from tspin.batch import collate
from tspin.data import build_features
from tspin.experiments.demo import make_task
from tspin.io import read_jsonl
from tspin.losses import batched_logps
from tspin.models import load_tokenizer
from tspin.selfplay import iterate

FIELDS = {"tspin": ("real", "generated", "proto"), "spin": ("real", "generated")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m"), hidden=32, layers=2, heads=2)


def _feats(tok, n, fields, ref=False):
    """Responses of different lengths; `generated` shares the real response's first tokens."""
    recs = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "real": r["response"],
             "generated": r["response"][:2] + r["response"][::-1], "proto": r["response"][::-1] + "ab",
             "generated_prev": r["response"][1:], "ref_real": -20.0 - i, "ref_generated": -25.0 + i}
            for i, r in enumerate(make_task(n, 4))]
    return build_features(recs, tok, fields, template="paper", max_length=40, max_prompt_length=24, ref=ref)


@pytest.mark.parametrize("extra", [{}, {"gradient_checkpointing": True, "lora_rank": 4, "lora_alpha": 8.0}],
                         ids=["full", "checkpointing+lora"])
@pytest.mark.parametrize("method", ["tspin", "spin"])
def test_trains_like_the_padded_layout(model_dir, tmp_path, method, extra):
    """Same data, same steps: the final weights and every logged loss agree with the padded layout's, under
    either attention."""
    tok = load_tokenizer(str(model_dir))
    feats = _feats(tok, 12, FIELDS[method], ref=method == "spin")
    cfg = lambda **kw: tiny_cfg(learning_rate=1e-2, model_name_or_path=str(model_dir), loss_impl="torch",  # noqa: E731
                                gradient_accumulation_steps=2, per_device_train_batch_size=3, **extra, **kw)
    # shared_prefix under auto (varlen_sdpa: one row) and under sdpa (dense masks, rows of the longest example)
    cfgs = {"padded": cfg(layout="padded"), "shared_prefix": cfg(layout="shared_prefix"),
            "shared_prefix_sdpa": cfg(layout="shared_prefix", attn_implementation="sdpa")}
    assert_trains_alike(tok, feats, cfgs, method=method, out=tmp_path,
                        keys=("loss", "grad_norm", "logps/real", "logps/generated"))


def test_reference_and_evaluation_logps_equal_padded(model_dir):
    """batched_logps (SPIN's reference values, with the previous iteration's samples too, and the evaluation's
    real-vs-greedy log-probs) gives the padded layout's numbers."""
    tok = load_tokenizer(str(model_dir))
    model = tiny_policy(model_dir)
    for fields in (("real", "generated", "generated_prev"), ("real", "generated")):
        feats = _feats(tok, 7, fields)
        out = [batched_logps(model, feats, fields, tok.pad_token_id, batch_size=3, impl="torch", layout=layout)
               for layout in ("padded", "shared_prefix")]
        for f in fields:
            assert out[1][f] == pytest.approx(out[0][f], abs=1e-4)


def test_collate_shares_the_prompt_and_sft_falls_back_to_packed(model_dir):
    tok = load_tokenizer(str(model_dir))
    feats = _feats(tok, 4, FIELDS["tspin"])
    b = collate(feats, FIELDS["tspin"], tok.pad_token_id, "shared_prefix")
    assert b.input_ids is None and b.shared.num_examples == 4 and b.shared.num_responses == 3
    padded = collate(feats, FIELDS["tspin"], tok.pad_token_id, "padded")
    assert b.num_tokens == padded.num_tokens and b.num_input_tokens == padded.num_input_tokens
    assert b.shared.sequence_tokens < padded.num_input_tokens
    sft = collate(feats, ("real",), tok.pad_token_id, "shared_prefix")
    packed = collate(feats, ("real",), tok.pad_token_id, "packed")
    assert sft.shared is None and torch.equal(sft.input_ids, packed.input_ids)
    with pytest.raises(ValueError, match="layout='shared': expected one of padded, packed, shared_prefix"):
        collate(feats, ("real",), tok.pad_token_id, "shared")


def test_iterate_tspin_with_shared_prefix(model_dir, tmp_path):
    data = task_file(tmp_path / "train.jsonl", 12)
    held = task_file(tmp_path / "eval.jsonl", 4, seed=2)
    cfg = tiny_cfg(method="tspin", model_name_or_path=str(model_dir), data_path=str(data), eval_data_path=str(held),
                   num_iterations=2, layout="shared_prefix", output_dir=str(tmp_path / "run"))
    summary = iterate(cfg)
    assert [e["iteration"] for e in summary["evals"]] == [-1, 0, 1]
    train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["phase"] == "train"]
    assert train and all(r["loss"] == r["loss"] and "margins/history" in r for r in train)


def test_flash_attention_is_refused_with_the_reason(model_dir):
    tok = load_tokenizer(str(model_dir))
    model = tiny_policy(model_dir)
    model.model.config._attn_implementation = "flash_attention_2"  # as if loaded so on a GPU with flash-attn
    batch = collate(_feats(tok, 2, FIELDS["tspin"]), FIELDS["tspin"], tok.pad_token_id, "shared_prefix")
    from tspin.losses import policy_logps

    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2': the shared-prefix layout needs"):
        policy_logps(model, batch)
