"""`tspin train` with LoRA in one process: only the adapters train (the LM head and every base weight frozen), the
checkpoint is the adapter, and it loads back (peft and `--resume`)."""

from __future__ import annotations

import json

import pytest
import torch
from _trainer_helpers import one_thread, task_file, tiny_cfg, tiny_model_dir, tiny_policy  # noqa: F401
from safetensors.torch import load_file

from tspin.cli import main
from tspin.config import save_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"), hidden=32, layers=2, heads=2)


def test_lora_train_saves_an_adapter_that_loads_back(model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(method="sft", model_name_or_path=str(model_dir), data_path=str(task_file(tmp_path / "t.jsonl", 12)),
                   eval_size=4, lora_rank=4, lora_alpha=8.0, lora_target_modules="q_proj,v_proj,down_proj",
                   learning_rate=5e-2, loss_impl="torch", output_dir=str(tmp_path / "run"))
    save_config(cfg, tmp_path / "lora.yaml")
    assert main(["train", "--config", str(tmp_path / "lora.yaml")]) == 0
    out = tmp_path / "run" / "model"
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "v_proj", "down_proj"}  # lora_target_modules
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    # the base (head included) is untouched, and the adapter changes the model's output
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(out))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tuned_base = {k.replace("base_layer.", ""): v for k, v in tuned.get_base_model().state_dict().items()
                  if "lora_" not in k}
    for k, v in base.state_dict().items():
        torch.testing.assert_close(tuned_base[k], v, rtol=0, atol=0, msg=k)
    ids = torch.tensor([[1, 5, 9, 7, 3]])
    assert not torch.allclose(tuned(ids).logits, base(ids).logits)
    # --resume on the finished run loads the adapter back into a fresh policy and evaluates it again
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert main(["train", "--config", str(tmp_path / "lora.yaml"), "--resume"]) == 0
    again = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again == pytest.approx(first)


def test_lora_keeps_the_head_frozen_and_rejects_it_as_a_target(model_dir):
    policy = tiny_policy(model_dir, lora_rank=2)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="target_modules: the LM head"):
        tiny_policy(model_dir, lora_rank=2, lora_target_modules="q_proj,lm_head")
    with pytest.raises(ValueError, match="lora_rank=-1"):
        tiny_cfg(lora_rank=-1)
