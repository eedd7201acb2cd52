"""Shared by the TRL / Trainer integration tests and the TRL memory benchmark: a character-level tokenizer built
here (no hub), a tiny real Llama sized to it (or to a larger vocabulary), and small preference / triplet datasets."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = "abcdefghijklmnopqrstuvwxyz ?:."
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; BOS prepended like Llama's tokenizer, EOS added by the trainers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_model(tokenizer, *, vocab_size: int | None = None, hidden: int = 32, layers: int = 2, seed: int = 0,
               tie: bool = False) -> LlamaForCausalLM:
    """A random Llama whose vocabulary covers the tokenizer (``vocab_size`` may make it larger, for memory)."""
    cfg = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=tie, attn_implementation="sdpa",
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # HF inits norms to 1: perturb them so that every parameter gets a distinct gradient
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(CHARS[:26]) for _ in range(rng.randint(lo, hi)))


def preference_rows(n: int, seed: int = 0, *, lo: int = 2, hi: int = 9,
                    prompt: tuple[int, int] = (3, 8)) -> dict[str, list[str]]:
    """Standard-format preference data of varied lengths (completions lo..hi characters): prompt / chosen /
    rejected strings."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        rows["prompt"].append(_words(rng, *prompt) + "?")
        rows["chosen"].append(" " + _words(rng, lo, hi))
        rows["rejected"].append(" " + _words(rng, lo, hi))
    return rows


def triplet_rows(n: int, seed: int = 0) -> dict[str, list[str]]:
    """T-SPIN data: prompt / real / generated / proto strings."""
    rows = preference_rows(n, seed)
    rng = random.Random(seed + 1)
    return {"prompt": rows["prompt"], "real": rows["chosen"], "generated": rows["rejected"],
            "proto": [" " + _words(rng, 2, 9) for _ in range(n)]}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads on a shared 2-core box; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
