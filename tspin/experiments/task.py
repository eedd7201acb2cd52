"""The demo's world: a family of string transformations, a raw pretraining corpus over all of them, an instruction
task over some of them, a character-level tokenizer and a tiny Llama, all built locally and deterministically.

Pretraining text is raw and untemplated (``rotl2(abcdef)=cdefab``) and covers every operation in ``OPS``; the
instruction task (``### Instruction: rotl2 abcdef`` -> ``cdefab``) uses the operations in ``TARGET_OPS`` only.
A policy pretrained on the corpus and instruction-tuned on a few hundred annotations is right on many prompts and
wrong in a systematic way on others (the operations and lengths it learned least), the regime the T-SPIN paper
starts from with a pretrained 7B model.
"""

from __future__ import annotations

import random
from collections.abc import Callable

LETTERS = "abcdefghijklmnop"


def _shift(s: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)


OPS: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "rotl1": lambda s: s[1:] + s[:1],
    "rotl2": lambda s: s[2:] + s[:2],
    "rotr1": lambda s: s[-1:] + s[:-1],
    "rotr2": lambda s: s[-2:] + s[:-2],
    "swap": lambda s: s[len(s) // 2:] + s[: len(s) // 2],
    "dropfirst": lambda s: s[1:],
    "droplast": lambda s: s[:-1],
    "shift": _shift,
    "evens": lambda s: s[::2],
}
TARGET_OPS = ("reverse", "sort", "rotl2", "rotr1", "swap", "shift")

# Raw document formats of the pretraining corpus: several, so that what the model learns is the operations rather
# than one layout, and an instruction template is one more layout to pick up.
RAW_FORMATS = ("{op}({s})=", "{op} {s} -> ", "{s} | {op} | ", "{op}: {s}\n")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
MARKERS = ["### Instruction: ", "\n\n### Response: "]


def _random_string(rng: random.Random, min_len: int, max_len: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))


def make_task(n: int, seed: int, *, ops: tuple[str, ...] = TARGET_OPS, min_len: int = 4,
              max_len: int = 8) -> list[dict]:
    """`n` instruction records {prompt_id, prompt, response}: ``"<op> <string>"`` -> the transformed string."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        op = rng.choice(sorted(ops))
        s = _random_string(rng, min_len, max_len)
        rows.append({"prompt_id": f"{seed}-{i:05d}", "prompt": f"{op} {s}", "response": OPS[op](s)})
    return rows


def make_splits(n_train: int, n_val: int, n_test: int, seed: int, **kw) -> dict[str, list[dict]]:
    """Instruction records for training, validation and test: no prompt occurs twice, within or across splits."""
    rows, seen = [], set()
    for r in make_task(3 * (n_train + n_val + n_test) + 100, seed, **kw):
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            rows.append(r)
    if len(rows) < n_train + n_val + n_test:
        raise ValueError(f"only {len(rows)} distinct prompts for {n_train + n_val + n_test} records")
    return {"train": rows[:n_train], "val": rows[n_train:n_train + n_val],
            "test": rows[n_train + n_val:n_train + n_val + n_test]}


def make_corpus(n: int, seed: int, *, exclude: set[str] = frozenset(), min_len: int = 4,
                max_len: int = 8) -> list[dict]:
    """`n` raw pretraining documents such as ``<op>(<string>)=<result>`` over every operation, as {prompt, response}
    records split at ``=`` (trained as SFT with the template ``{prompt}``: causal-LM loss on the result tokens;
    the input string is uniform noise, nothing there to learn). Documents whose instruction ``"<op> <string>"``
    is in `exclude` (the held-out prompts) are skipped."""
    rng = random.Random(seed)
    names = sorted(OPS)
    rows = []
    while len(rows) < n:
        op = rng.choice(names)
        s = _random_string(rng, min_len, max_len)
        if f"{op} {s}" in exclude:
            continue
        fmt = rng.choice(RAW_FORMATS)
        rows.append({"prompt_id": f"pt{seed}-{len(rows):06d}", "prompt": fmt.format(op=op, s=s),
                     "response": OPS[op](s)})
    return rows


def build_tokenizer():
    """Character-level WordLevel tokenizer; the template markers and operation names are single added tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(LETTERS) + [" ", ":", "\n", "#", "(", ")", "=", "-", ">", "|"]
    vocab = {t: i for i, t in enumerate(SPECIAL + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    tok.add_tokens(MARKERS + sorted(OPS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_model(tokenizer, *, hidden: int = 96, layers: int = 3, heads: int = 4, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)
