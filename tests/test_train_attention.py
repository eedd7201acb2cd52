"""The trainer's attention: ``attn_implementation: auto`` resolves per layout (varlen_sdpa for packed and
shared_prefix rows on the CPU, transformers' default for padded rows), an explicit value wins, the choice is on
every metrics line, and packed rows under varlen_sdpa train exactly like padded rows: every logged number and the
final weights, for SFT (which packs) and T-SPIN, with sequences cut at max_length."""

import pytest
import torch
from _trainer_helpers import (  # noqa: F401 (one_thread: autouse)
    assert_trains_alike,
    one_thread,
    task_file,
    tiny_cfg,
    tiny_model_dir,
)

from tspin.config import load_config
from tspin.data import build_features
from tspin.experiments.demo import make_task
from tspin.io import read_jsonl
from tspin.models import load_policy, load_tokenizer
from tspin.settings import load_settings
from tspin_kernels.integrations import attention_implementation

FIELDS = {"sft": ("real",), "tspin": ("real", "generated", "proto")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m"), hidden=32, layers=2, heads=2)


@pytest.mark.parametrize("layout,method,override,expected", [
    ("padded", "tspin", "auto", "sdpa"), ("packed", "tspin", "auto", "varlen_sdpa"),
    ("shared_prefix", "tspin", "auto", "varlen_sdpa"), ("shared_prefix", "sft", "auto", "varlen_sdpa"),
    ("packed", "sft", "sdpa", "sdpa"), ("padded", "tspin", "varlen_sdpa", "varlen_sdpa"),
    ("shared_prefix", "spin", "eager", "eager")])
def test_auto_resolves_per_layout_and_an_explicit_value_wins(model_dir, layout, method, override, expected):
    cfg = tiny_cfg(model_name_or_path=str(model_dir), layout=layout, method=method, attn_implementation=override)
    assert attention_implementation(load_policy(load_settings(cfg)).model) == expected


def test_bad_values_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="attn_implementation='fast': expected one of auto, varlen_sdpa"):
        load_config(None, {"attn_implementation": "fast"})
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2': the shared_prefix layout needs"):
        load_config(None, {"attn_implementation": "flash_attention_2", "layout": "shared_prefix"})
    load_config(None, {"attn_implementation": "flash_attention_2", "layout": "shared_prefix", "method": "sft"})


@pytest.mark.parametrize("name,reason", [("flex_attention", "FlexAttention has no backward on the CPU"),
                                         ("flash_attention_2", "needs a CUDA device and the flash-attn package")])
def test_what_cannot_train_here_is_refused_before_loading(model_dir, name, reason):
    from tspin.models import resolve_attn_implementation

    cfg = tiny_cfg(model_name_or_path=str(model_dir), layout="packed", attn_implementation=name)
    with pytest.raises(ValueError, match=f"attn_implementation='{name}'.*{reason}"):
        resolve_attn_implementation(cfg.attn_implementation, cfg.layout, torch.device("cpu"))
    with pytest.raises(ValueError, match=reason):
        load_policy(load_settings(cfg))


def _feats(tok, n, fields):
    """Responses of varying lengths; max_length 30 cuts the longest sequences (they end at the cap, no EOS)."""
    recs = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "real": r["response"] * (1 + i % 3),
             "generated": r["response"][1:], "proto": r["response"][::-1] + "ab"}
            for i, r in enumerate(make_task(n, 4))]
    feats = build_features(recs, tok, fields, template="paper", max_length=30, max_prompt_length=20)
    assert any(len(f["real"][0]) == 30 for f in feats) and len({len(f["real"][0]) for f in feats}) > 2
    return feats


@pytest.mark.parametrize("method", ["sft", "tspin"])
def test_packed_under_varlen_sdpa_trains_like_padded(model_dir, tmp_path, method):
    tok = load_tokenizer(str(model_dir))
    feats = _feats(tok, 12, FIELDS[method])
    cfgs = {layout: tiny_cfg(learning_rate=1e-2, model_name_or_path=str(model_dir), layout=layout, method=method,
                             loss_impl="torch", per_device_train_batch_size=3, gradient_accumulation_steps=2)
            for layout in ("padded", "packed")}  # auto: sdpa, varlen_sdpa (test above)
    assert_trains_alike(tok, feats, cfgs, method=method, out=tmp_path)


def test_the_choice_is_on_every_metrics_line(model_dir, tmp_path):
    from tspin.selfplay import train

    data = task_file(tmp_path / "sft.jsonl", 6)
    for name, override, expected in (("auto", "auto", "varlen_sdpa"), ("sdpa", "sdpa", "sdpa")):
        train(tiny_cfg(method="sft", layout="packed", model_name_or_path=str(model_dir), data_path=str(data),
                       attn_implementation=override, output_dir=str(tmp_path / name)))
        lines = read_jsonl(tmp_path / name / "metrics.jsonl")
        assert lines and {r["attn_implementation"] for r in lines} == {expected}
