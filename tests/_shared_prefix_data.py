"""Shared-prefix test data: tiny models of three families built from configs, and triplets whose prompt and
response lengths vary across examples (a one-token response, a truncated one, an emptied one, responses whose
first tokens coincide), as (input_ids, labels) lists exactly as the padded layout tokenizes them."""

from __future__ import annotations

import torch

from tests._hf_tiny import VOCAB, tiny_llama

IGNORE = -100
EOS = 2


def tiny_model(family: str, attn: str = "sdpa", seed: int = 0):
    """A random tiny causal LM of ``family`` (llama, qwen2, gpt_neox) in float32, untied head."""
    if family == "llama":
        return tiny_llama(seed, attn_implementation=attn)
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                  eos_token_id=EOS, attn_implementation=attn)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **common))
    elif family == "gpt_neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(rotary_pct=0.5, **common))
    else:
        raise ValueError(family)
    return model.float()


def sequence(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
    return prompt + response, [IGNORE] * len(prompt) + response


def triplets(seed: int = 0, *, max_length: int = 24) -> list[list[tuple[list[int], list[int]]]]:
    """Five T-SPIN triplets [real, generated, proto] with the awkward cases the layout must get right."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731 (never pad/bos/eos)
    out = []
    specs = [  # (prompt length, response lengths, how)
        (5, (4, 6, 3), "plain"),
        (9, (1, 5, 2), "one-token real"),
        (3, (7, 7, 4), "first tokens coincide"),  # the shared part runs into the responses
        (14, (12, 3, 5), "truncated real"),  # cut at max_length: no EOS
        (6, (2, 0, 8), "emptied generated"),  # a response cut to nothing: its log-prob is 0
    ]
    for P, lengths, how in specs:
        prompt = rand(P)
        responses = [rand(n - 1) + [EOS] if n else [] for n in lengths]
        if how == "first tokens coincide":
            for r in responses:
                r[:2] = [11, 12]
            responses[2][2] = responses[0][2]  # proto shares three tokens with real
        if how == "truncated real":
            responses[0] = (responses[0] + rand(20))[: max_length - P]
        out.append([sequence(prompt, r) for r in responses])
    return out


def padded_rows(examples) -> dict[str, torch.Tensor]:
    """The padded layout of ``examples``: rows [response 1 of every example; response 2 ...], right-padded."""
    k = len(examples[0])
    seqs = [ex[j] for j in range(k) for ex in examples]
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, (s, lab) in enumerate(seqs):
        ids[r, : len(s)], labels[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), torch.tensor(lab), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
