"""Preference examples for T-SPIN and SPIN, one implementation for every trainer: ``tspin``'s own loop and
:class:`~tspin_kernels.integrations.tspin_trainer.TSPINTrainer` (the Hugging Face Trainer / TRL one) tokenize,
collate and log with the functions here.

- Tokenization (:func:`tokenize_examples`): an example is a prompt and one response per field (``real``,
  ``generated``, ``proto``). A written response (text) is tokenized jointly with its prompt, as a tokenizer sees a
  written example, and ends with the end token; a sampled response that carries its token ids (``<field>_ids``) is
  trained on exactly those ids after the prompt ids the sampler saw (its stop token included when it finished; a
  sample cut at max_new_tokens, ``<field>_truncated``, gets no end token unless asked). A prompt longer than
  ``max_prompt_length`` keeps its last tokens; the response is then cut at the end to fit ``max_length``.
- Collation (:func:`field_major`, :func:`pad_rows`, :func:`pack_rows`): rows field-major, ``[real of every
  example; generated of every example; ...]`` (the order the losses split with ``chunk``), right-padded or packed
  into one padding-free row.
- Metrics (:func:`tspin_metrics`, :func:`spin_metrics`): TRL's names from the rows' log-probs.
"""

from __future__ import annotations

from itertools import accumulate

import torch

__all__ = ["IGNORE_INDEX", "end_of_turn_id", "render_chat", "encode_prompts", "encode_joint", "join",
           "tokenize_examples", "field_major", "pad_rows", "pack_rows", "tspin_metrics", "spin_metrics"]

IGNORE_INDEX = -100  # labels of prompt tokens and padding (Hugging Face's ignore_index)
Row = tuple[list[int], list[int]]  # (input_ids, labels) of one sequence


# ----------------------------------------------------------------------------- tokenization
def end_of_turn_id(tokenizer, chat: bool) -> int | None:
    """The token a finished response ends with: with ``chat``, the chat template's end-of-turn token (what the
    template writes after an assistant message, e.g. <|im_end|>, <|eot_id|>, <end_of_turn>, when that is one special
    token), else the tokenizer's EOS."""
    eos = tokenizer.eos_token_id
    if not chat or not getattr(tokenizer, "chat_template", None):
        return eos
    marker = "\x00tspin-end\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant",
                                                                                  "content": marker}], tokenize=False)
    except Exception:  # a template that refuses this conversation: fall back to EOS
        return eos
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else eos


def render_chat(tokenizer, messages: list[dict], label: str = "prompt_template='chat'") -> str:
    """``messages`` rendered by the tokenizer's chat template, ending with the assistant's generation prompt; a
    template error (or one the sandbox stops) is a ValueError that starts with ``label``."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{label}: the tokenizer has no chat_template")
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2 (sandboxed)

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ValueError(f"{label}: the chat_template of {where} failed ({type(e).__name__}: "
                         f"{' '.join(str(e).split())}); fix the template in its tokenizer_config.json / "
                         "chat_template.jinja") from None


def _last(ids: list[int], n: int | None) -> list[int]:
    return ids if n is None else ids[-n:]


def encode_prompts(tokenizer, texts: list[str], *, chat: bool, max_prompt_length: int | None) -> list[list[int]]:
    """The ids of formatted prompts, as a sampler sees them (the last ``max_prompt_length`` kept). A chat template
    writes its own BOS; plain text gets the tokenizer's special tokens."""
    ids = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    return [_last(x, max_prompt_length) for x in ids]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_joint(tokenizer, texts: list[str], responses: list[str], *, chat: bool,
                 max_prompt_length: int | None) -> list[Row]:
    """(prompt ids, response ids) of each formatted prompt + response tokenized as one text, as a tokenizer sees a
    written example: with SentencePiece (Metaspace) or byte-level BPE, a response joined to a prompt ending in a
    space starts with a word token that holds the space (``▁dcba``), not with the ids of the response tokenized
    alone. The split is where the joint ids stop agreeing with the prompt's own ids; no end token is added."""
    alone = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    joint = tokenizer([t + r for t, r in zip(texts, responses)], add_special_tokens=not chat)["input_ids"]
    out = []
    for p, j in zip(alone, joint):
        k = _common_prefix(p, j)
        out.append((_last(j[:k], max_prompt_length), j[k:]))
    return out


def join(prompt_ids: list[int], response_ids: list[int], max_length: int | None) -> Row:
    """One row: the response cut at the end to fit ``max_length``; labels ``IGNORE_INDEX`` on the prompt."""
    if max_length is not None:
        response_ids = response_ids[: max(0, max_length - len(prompt_ids))]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def tokenize_examples(tokenizer, prompts: list[str], examples: list[dict], fields: tuple[str, ...], *, chat: bool,
                      max_length: int | None, max_prompt_length: int | None,
                      end_truncated: bool = False) -> list[dict[str, Row]]:
    """Per example, ``{field: (input_ids, labels)}`` for each of ``fields``.

    ``prompts``: the examples' prompts as text, formatted (a template or :func:`render_chat` applied); ``chat``:
    whether a chat template wrote them (it writes its own BOS, and the end token is the template's end of turn).
    ``examples[i][field]`` is the response text; ``<field>_ids`` (optional) the ids it was sampled as, the stop token
    included when it finished, and ``<field>_truncated`` whether it was cut at max_new_tokens (then no end token is
    added, unless ``end_truncated``). A written response gets the end token unless its ids already end with it.
    """
    alone = encode_prompts(tokenizer, prompts, chat=chat, max_prompt_length=max_prompt_length)  # what a sampler saw
    end = end_of_turn_id(tokenizer, chat)
    out: list[dict[str, Row]] = [{} for _ in examples]
    for f in fields:
        joint = encode_joint(tokenizer, prompts, [ex[f] for ex in examples], chat=chat,
                             max_prompt_length=max_prompt_length)
        for rows, ex, p, (jp, jr) in zip(out, examples, alone, joint):
            truncated = bool(ex.get(f"{f}_truncated"))
            tail = [end] if end is not None and (not truncated or end_truncated) else []
            if ex.get(f"{f}_ids") is not None:  # a finished sample's ids end with the stop token it sampled
                rows[f] = join(p, list(ex[f"{f}_ids"]) + (tail if truncated else []), max_length)
            else:
                rows[f] = join(jp, jr + (tail if jr[-1:] != tail else []), max_length)
    return out


# ----------------------------------------------------------------------------- collation
def field_major(examples: list[dict[str, Row]], fields: tuple[str, ...]) -> list[Row]:
    """The rows of ``examples`` in the losses' order: every example's first field, then every example's second..."""
    return [ex[f] for f in fields for ex in examples]


def pad_rows(rows: list[Row], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, attention_mask)``, each ``(R, T)``, right-padded (positions 0..len-1 are tokens)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(ids)] = 1
    return input_ids, labels, mask


def pack_rows(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One padding-free row: ``(input_ids (1, N), labels (1, N), position_ids (1, N) restarting at 0 per sequence,
    cu_seqlens (R+1,) int32 offsets)``."""
    ids = torch.tensor([t for s, _ in rows for t in s], dtype=torch.long)[None]
    labels = torch.tensor([t for _, lab in rows for t in lab], dtype=torch.long)[None]
    positions = torch.tensor([i for s, _ in rows for i in range(len(s))], dtype=torch.long)[None]
    cu_seqlens = torch.tensor([0, *accumulate(len(s) for s, _ in rows)], dtype=torch.int32)
    return ids, labels, positions, cu_seqlens


# ----------------------------------------------------------------------------- metrics
def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().mean()


def tspin_metrics(real: torch.Tensor, generated: torch.Tensor, proto: torch.Tensor | None = None, *,
                  alpha: float) -> dict[str, torch.Tensor]:
    """T-SPIN's logged numbers (0-d float32 tensors, on the log-probs' device) from the per-example log-probs of
    y, y' and, with its history term, y0: TRL's ``logps/*``, ``rewards/*`` (``alpha * logp``), ``rewards/margins``
    and ``rewards/accuracies``, and ``margins/current`` (y vs y'), ``margins/history`` (y' vs y0) with
    ``rewards/history_accuracies``."""
    current = real - generated
    metrics = {
        "logps/real": _mean(real), "logps/generated": _mean(generated), "rewards/real": _mean(alpha * real),
        "rewards/generated": _mean(alpha * generated), "rewards/margins": _mean(alpha * current),
        "rewards/accuracies": _mean((current > 0).float()), "margins/current": _mean(current),
    }
    if proto is not None:
        history = generated - proto
        metrics.update({"logps/proto": _mean(proto), "rewards/proto": _mean(alpha * proto),
                        "margins/history": _mean(history), "rewards/history_accuracies": _mean((history > 0).float())})
    return metrics


def spin_metrics(real: torch.Tensor, generated: torch.Tensor, ref_real: torch.Tensor, ref_generated: torch.Tensor,
                 *, beta: float) -> dict[str, torch.Tensor]:
    """SPIN's logged numbers: TRL's DPO names, the rewards ``beta * (logp - ref_logp)``."""
    r_real, r_gen = beta * (real - ref_real), beta * (generated - ref_generated)
    return {
        "logps/real": _mean(real), "logps/generated": _mean(generated),
        "rewards/real": _mean(r_real), "rewards/generated": _mean(r_gen),
        "rewards/margins": _mean(r_real - r_gen), "rewards/accuracies": _mean((r_real > r_gen).float()),
        "margins/current": _mean(real - generated),
    }
