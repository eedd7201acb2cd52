"""The demo's world: a family of string transformations, a raw pretraining corpus over all of them, an instruction
task that chains some of them, a character-level tokenizer and a tiny Llama, all built locally and
deterministically.

Pretraining text is raw and untemplated (``rotl2(abcdef)=cdefab``): one operation per document, every operation in
``OPS``. The instruction task chains 2-3 operations of ``TARGET_OPS`` and the answer shows every step
(``### Instruction: rotl2 shift abcdefg`` -> ``cdefgab > defghbc``, or ``cdefgab -> defghbc``: each annotation
joins the steps with one of :data:`SEPARATORS`), so a policy's own sample rarely equals the annotation (where it
does, self-play's gradient vanishes), while exact match (:data:`ANSWER_PATTERN`) still scores the steps.
Instruction strings and pretraining strings come from two disjoint halves of the string space
(:func:`in_task_space`): no instruction prompt's first step is ever a pretraining document, whatever the seed.
"""

from __future__ import annotations

import random
import zlib
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


STEP_SEPARATOR = " > "
# How annotators join the steps of an answer: each annotation draws one (real annotations word the same content
# differently, so a policy that has learned the task still samples the annotation's exact text only now and then).
SEPARATORS = (" > ", " -> ", " | ")
# Exact match compares the step results in order (letter runs) and any character that is neither a letter nor a
# separator's (an operation's name, a bracket): the separator an annotator chose is free, as SQuAD's exact match
# ignores punctuation. (Config.eval_answer_pattern.)
ANSWER_PATTERN = r"[a-p]+|[^a-p\s>|-]"


def in_task_space(s: str) -> bool:
    """Whether `s` may start an instruction prompt (a fixed pseudo-random half of all strings, by CRC-32); the
    pretraining corpus draws from the other half."""
    return zlib.crc32(s.encode()) % 2 == 0


def chain(ops: list[str], s: str, separator: str = STEP_SEPARATOR) -> str:
    """The answer to a chained instruction: the result of every step, in order, joined by `separator`."""
    steps = []
    for op in ops:
        s = OPS[op](s)
        steps.append(s)
    return separator.join(steps)


def make_chain_splits(n_train: int, n_val: int, n_test: int, seed: int, *, ops: tuple[str, ...] = TARGET_OPS,
                      min_len: int = 6, max_len: int = 9, min_steps: int = 2,
                      max_steps: int = 3, separators: tuple[str, ...] = (STEP_SEPARATOR,)) -> dict[str, list[dict]]:
    """Chained instruction records {prompt_id, prompt, response} for training, validation and test, drawn with
    `seed` (each seed its own prompts): ``"<op1> <op2> [<op3>] <string>"`` -> :func:`chain`, its steps joined by
    one of `separators` drawn per record. No prompt occurs twice, within or across splits, and every string is in
    :func:`in_task_space`."""
    rng, names = random.Random(seed), sorted(ops)
    total, rows, seen = n_train + n_val + n_test, [], set()
    for _ in range(50 * total + 1000):
        if len(rows) == total:
            break
        steps = [rng.choice(names) for _ in range(rng.randint(min_steps, max_steps))]
        s = _random_string(rng, min_len, max_len)
        prompt = " ".join(steps + [s])
        if in_task_space(s) and prompt not in seen:
            seen.add(prompt)
            # one separator: no draw, so that such splits stay those of the designs before separators varied
            sep = separators[0] if len(separators) == 1 else rng.choice(list(separators))
            rows.append({"prompt_id": f"{seed}-{len(rows):05d}", "prompt": prompt,
                         "response": chain(steps, s, sep)})
    if len(rows) < total:
        raise ValueError(f"only {len(rows)} distinct prompts for {total} records")
    return {"train": rows[:n_train], "val": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}


def make_corpus(n: int, seed: int, *, min_len: int = 4, max_len: int = 8, max_steps: int = 1) -> list[dict]:
    """`n` raw pretraining documents such as ``<op>(<string>)=<result>`` over every operation, or a chain of up to
    `max_steps` of them with every step's result (``rotl2 shift(abcdef)=cdefab > defgbc``), as {prompt, response}
    records split at ``=`` (trained as SFT with the template ``{prompt}``: causal-LM loss on the results; the
    input string is uniform noise, nothing there to learn). Strings come from outside :func:`in_task_space`, so no
    document starts like an instruction prompt."""
    rng = random.Random(seed)
    names = sorted(OPS)
    rows = []
    while len(rows) < n:
        ops = [rng.choice(names) for _ in range(rng.randint(1, max_steps))]
        s = _random_string(rng, min_len, max_len)
        if in_task_space(s):
            continue
        fmt = rng.choice(RAW_FORMATS)
        rows.append({"prompt_id": f"pt{seed}-{len(rows):06d}", "prompt": fmt.format(op=" ".join(ops), s=s),
                     "response": chain(ops, s)})
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
