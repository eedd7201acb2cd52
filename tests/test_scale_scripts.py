"""The GPU check script at toy size on CPU, and the memory-guide arithmetic against real model configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from tspin.memory import GIB, SHAPES, estimate_bytes, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_toy_run(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TSPIN_IMPL": "torch"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_fsdp_lora_check.py"), "--toy", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert {"device", "torch", "transformers", "peft", "commit"} <= set(res)
    assert res["fsdp2"]["match"] and res["fsdp2"]["world_size"] == 1
    assert res["fsdp2"]["grad_max_rel_diff"] < 1e-5
    lora = res["lora7b"]
    assert lora["finite"] and lora["head_frozen"] and 0 < lora["trainable_params"] < lora["params"]
    assert lora["losses"][-1] < lora["losses"][0]  # AdamW on the adapters moves the loss


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_script_refuses_full_size_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_fsdp_lora_check.py"), "--only", "lora7b",
           "--out", str(tmp_path / "x.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and not (tmp_path / "x.json").exists()


def _count(cfg) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("key,cfg", [
    ("mistral-7b", MistralConfig()),
    ("llama3-8b", LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256)),
    ("qwen2.5-1.5b", Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
])
def test_memory_guide_param_counts_match_the_real_models(key, cfg):
    assert SHAPES[key].params == _count(cfg)


def test_memory_guide_lora_param_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    cfg = MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=100)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=4, target_modules="all-linear"))
    shape = type(SHAPES["mistral-7b"])("toy", 64, 2, 160, 100, 2 * 16, False)
    assert shape.lora_params(4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_memory_estimate_arithmetic():
    s = SHAPES["mistral-7b"]
    ddp = estimate_bytes(s, "full-ddp", optimizer="adamw")
    assert ddp["weights"] == 16 * s.params
    fsdp = estimate_bytes(s, "full-fsdp2", gpus=8)
    assert fsdp["weights"] == pytest.approx(16 * s.params / 8 + 4 * s.block_params)
    assert estimate_bytes(s, "full-ddp", optimizer="rmsprop")["weights"] == 12 * s.params
    gc = estimate_bytes(s, "lora", checkpointing=True)["activations"]
    full = estimate_bytes(s, "lora", checkpointing=False)["activations"]
    assert gc < full / 5
    assert 13 * GIB < estimate_bytes(s, "lora")["weights"] < 15 * GIB
    assert "Mistral-7B (7.2B)" in markdown_table()
    with pytest.raises(ValueError, match="method"):
        estimate_bytes(s, "zero3")
    with pytest.raises(ValueError, match="gpus"):
        estimate_bytes(s, "full-fsdp2", gpus=0)


@pytest.mark.gpu
def test_gpu_check_script_fsdp2_on_one_gpu(tmp_path):
    """The one-GPU FSDP2 step (0.6B Llama, fp32) against the unwrapped model, through the real script."""
    out = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TRITON_INTERPRET")}
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_fsdp_lora_check.py"), "--only", "fsdp2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["fsdp2"]["match"], res["fsdp2"]
