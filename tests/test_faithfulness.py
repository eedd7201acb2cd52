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
