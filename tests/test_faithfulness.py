"""What the method needs from the loop at paper scale, checked where a shortcut would go wrong: dropout off while
training (log-probs equal to eval mode's), T-SPIN without history needs no proto, tokenization of the triplet's
rows, stop tokens and truncated samples."""

import pytest
import torch
from _trainer_helpers import one_thread, task_file, tiny_cfg, tiny_model_dir  # noqa: F401 (one_thread: autouse)

from tspin.batch import collate
from tspin.data import build_features
from tspin.demo import build_tokenizer, make_task
from tspin.losses import policy_logps
from tspin.models import load_policy


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
        policy = load_policy(tiny_cfg(model_name_or_path=str(path), disable_dropout=disable))
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


@pytest.mark.parametrize("fused", [False, True])  # the loss on log-probs, and the loss inside the head's forward
def test_tspin_pairs_loss_equals_triplets_with_beta_zero(tmp_path, fused):
    from tspin.losses import compute_loss

    tok = build_tokenizer()
    rows = [{"prompt_id": str(i), "prompt": r["prompt"], "real": r["response"], "generated": r["response"][1:],
             "proto": r["response"][::-1]} for i, r in enumerate(make_task(5, 3))]
    policy = load_policy(tiny_cfg(model_name_or_path=str(tiny_model_dir(tmp_path / "m"))))
    results = []
    for fields in (("real", "generated"), ("real", "generated", "proto")):
        feats = build_features(rows, tok, fields, template="paper", max_length=40, max_prompt_length=24)
        policy.zero_grad()
        loss, metrics = compute_loss(policy, collate(feats, fields, tok.pad_token_id), method="tspin", alpha=0.5,
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
    with pytest.raises(ValueError, match="needs the proto rows"):
        compute_loss(policy, collate(feats, ("real", "generated"), tok.pad_token_id), method="tspin", beta=0.1)
