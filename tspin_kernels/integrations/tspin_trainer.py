"""T-SPIN for people who train with TRL / the Hugging Face Trainer: one self-play iteration on a triplet dataset.

    trainer = TSPINTrainer(model, args=TSPINConfig(output_dir="out", alpha=1.0, beta=0.1),
                           train_dataset=ds,              # columns: prompt, real, generated, proto
                           processing_class=tokenizer, peft_config=None)
    trainer.train()

Dataset: like TRL's preference data, standard (strings) or conversational (``prompt`` a list of messages, each
completion a list with the one assistant message); ``prompt_id`` and other columns are ignored. Files written by
``tspin iterate`` (``iter{t}/data.jsonl``) load as they are, and their sampled responses are trained on the token
ids they were sampled as (``generated_ids``, ``proto_ids``; a sample cut at max_new_tokens, ``*_truncated``, gets
no EOS). Tokenization, collation and the logged metrics are ``tspin``'s own (:mod:`.triplets`): this trainer and
``tspin train`` build the same rows from the same records. Each step runs the policy once over the rows
``[real; generated; proto]`` of its triplets, through the fused kernels (no logits), and minimises

    -logsigmoid(alpha * (logp(real) - logp(generated))) + beta * -logsigmoid(alpha * (logp(generated) - logp(proto)))

with no reference model. Logged: TRL-style ``logps/real|generated|proto``, ``rewards/*`` (``alpha * logp``),
``rewards/margins``, ``rewards/accuracies``, ``rewards/history_accuracies`` and ``margins/current|history``.

Why not a ``trl.DPOTrainer`` subclass: DPOTrainer's data path (prompt/chosen/rejected, two rows per example), its
loss (one function with a reference model in every term) and its construction (it loads or copies a reference
model unless PEFT or precomputed log-probs stand in) are all built around pairs plus a reference; T-SPIN has
triplets and no reference, so a subclass would replace every piece and still pay for the reference. This trainer
is the plain ``transformers.Trainer`` (the base of every TRL trainer: same arguments, launchers, PEFT, DeepSpeed /
FSDP through Accelerate) with the loss computed through :func:`install_fused_loss`, inside the LM head's forward
(a :class:`LossSpec`): tspin_kernels takes its fastest measured path there (on CUDA the fused one, which forms the
head's gradients while the logits are at hand); ``TSPINConfig(fused=False)`` asks for log-probs with their own
backward instead.

A T-SPIN *iteration* needs ``generated`` sampled from the current policy (and ``proto`` once from the initial
one); this trainer trains on whatever the dataset holds. ``tspin iterate`` runs the whole loop (generation,
training, evaluation, resume).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from .._options import check_real
from .hf_trainer import install_fused_loss
from .loss_spec import LossSpec
from .triplets import IGNORE_INDEX, field_major, pad_rows, render_chat, tokenize_examples, tspin_metrics

__all__ = ["TSPINConfig", "TSPINTrainer", "TripletCollator", "tokenize_triplet"]

FIELDS = ("real", "generated", "proto")


@dataclass
class TSPINConfig(TrainingArguments):
    """``TrainingArguments`` plus T-SPIN's coefficients and the tokenization limits."""

    alpha: float = field(default=1.0, metadata={"help": "Scales both log-prob differences (the reward is alpha*logp)."})
    beta: float = field(default=0.1, metadata={"help": "Weight of the history term l(alpha*(logp(y')-logp(y0)))."})
    max_length: int | None = field(default=1024, metadata={"help": "Tokens kept per prompt+completion: the "
                                                                   "completion is cut at the end to fit; None keeps "
                                                                   "everything."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Prompt tokens kept, the last ones (as "
                                                                          "tspin and TRL's DPO keep them); None keeps "
                                                                          "the whole prompt, and an example whose "
                                                                          "prompt leaves no room under max_length is "
                                                                          "dropped."})
    impl: str = field(default="auto", metadata={"help": "tspin_kernels.sequence_logps implementation."})
    fused: bool | None = field(default=None, metadata={"help": "tspin_kernels.tspin_loss' fused: None lets the kernels "
                                                                "choose (the fastest measured path), True / False "
                                                                "ask for the fused path or for log-probs with their "
                                                                "own backward."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "The collator reads the token columns."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("alpha", "beta"):  # the kernels' rule for loss scales (finite, bounded), and not negative
            value = getattr(self, name)
            try:
                check_real(name, value)
            except TypeError as e:
                raise ValueError(str(e)) from None
            if value < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(f"max_length: expected an int >= 2 or None, got {self.max_length!r}")
        if self.max_prompt_length is not None and (
                not isinstance(self.max_prompt_length, int) or self.max_prompt_length < 1
                or self.max_length is not None and self.max_prompt_length >= self.max_length):
            raise ValueError(f"max_prompt_length: expected an int >= 1 below max_length ({self.max_length}) or None, "
                             f"got {self.max_prompt_length!r}")
        LossSpec("tspin", alpha=self.alpha, beta=self.beta, fused=self.fused)  # checks fused


def _completion(value, key: str, conversational: bool) -> str:
    """A completion's text: the string, or the content of a conversational completion's one assistant message."""
    if isinstance(value, str) != (not conversational):
        raise ValueError(f"train_dataset: '{key}' and 'prompt' must both be strings or both be message lists")
    if not conversational:
        return value
    message = value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else None
    content = message.get("content") if isinstance(message, dict) and message.get("role") == "assistant" else None
    if not isinstance(content, str):
        raise ValueError(f"train_dataset: '{key}': expected one assistant message [{{'role': 'assistant', 'content': "
                         f"...}}] as the completion, got {value!r:.200}")
    return content


def tokenize_triplet(example: dict, tokenizer, *, max_length: int | None = None,
                     max_prompt_length: int | None = None) -> dict:
    """``prompt_ids``, ``{real,generated,proto}_ids`` and ``{real,generated,proto}_prompt_len``: each row is
    ``prompt_ids + <field>_ids``, whose first ``<field>_prompt_len`` ids still belong to that row's prompt (0 unless
    the rows' prompts differ, see below); the rest is the completion, trained on.

    As ``tspin`` tokenizes (:func:`.triplets.tokenize_examples`): a written completion is tokenized jointly with
    its prompt (so tokens merging across the boundary are right), starts where the joint ids depart from the
    prompt's own, and ends with one EOS (a conversational one: the chat template's end of turn); a sampled one
    that carries its ids (``<field>_ids``, as ``tspin iterate`` writes) is trained on those ids after the whole
    prompt, and gets no EOS when it was cut at max_new_tokens (``<field>_truncated``). ``max_prompt_length`` keeps
    the prompt's last tokens; ``max_length`` cuts the completion at the end. ``prompt_ids`` is what the three rows
    share before their first trained token.
    """
    missing = [k for k in ("prompt",) + FIELDS if example.get(k) is None]
    if missing:
        raise ValueError(f"train_dataset: record without {missing}; expected columns prompt, real, generated, proto")
    prompt = example["prompt"]
    conversational = not isinstance(prompt, str)
    record = {key: _completion(example[key], key, conversational) for key in FIELDS}
    for key in FIELDS:  # sampled responses: the ids as sampled and whether the sample was cut
        record.update({k: example[k] for k in (f"{key}_ids", f"{key}_truncated") if example.get(k) is not None})
    text = render_chat(tokenizer, list(prompt), label="train_dataset: prompt") if conversational else prompt
    (rows,) = tokenize_examples(tokenizer, [text], [record], FIELDS, chat=conversational, max_length=max_length,
                                max_prompt_length=max_prompt_length)
    prompt_lens = {key: _prompt_len(labels) for key, (_, labels) in rows.items()}
    shared = min(prompt_lens.values())
    first = rows[FIELDS[0]][0]
    for ids, _ in rows.values():
        shared = next((i for i, (a, b) in enumerate(zip(first[:shared], ids)) if a != b), shared)
    out = {"prompt_ids": first[:shared]}
    for key, (ids, _) in rows.items():
        out[f"{key}_ids"], out[f"{key}_prompt_len"] = ids[shared:], prompt_lens[key] - shared
    return out


def _prompt_len(labels: list[int]) -> int:
    return next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))


@dataclass
class TripletCollator:
    """Right-padded rows ``[real_0..real_{B-1}; generated_0..; proto_0..]`` (:func:`.triplets.pad_rows`, as
    ``tspin`` pads); labels -100 on each row's prompt and on padding. Rows longer than ``max_length`` are cut."""

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = []
        for ex in examples:
            row = {}
            for key in FIELDS:
                ids = (ex["prompt_ids"] + ex[f"{key}_ids"])[: self.max_length]
                n_prompt = min(len(ex["prompt_ids"]) + ex.get(f"{key}_prompt_len", 0), len(ids))
                row[key] = (ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:])
            rows.append(row)
        input_ids, labels, mask = pad_rows(field_major(rows, FIELDS), self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class TSPINTrainer(Trainer):
    """``transformers.Trainer`` minimising the T-SPIN loss on (prompt, real, generated, proto) triplets."""

    def __init__(self, model, args: TSPINConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, data_collator=None, **kwargs):
        if args is None:
            args = TSPINConfig(output_dir="tspin-trainer")
        if not isinstance(args, TSPINConfig):
            raise TypeError(f"args: expected a TSPINConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("processing_class: the tokenizer is required (it tokenizes prompts and completions)")
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        install_fused_loss(model, impl=args.impl)
        train_dataset = self._tokenize(train_dataset, processing_class, args) if train_dataset is not None else None
        if eval_dataset is not None:
            eval_dataset = self._tokenize(eval_dataset, processing_class, args, "eval_dataset")
        collator = data_collator or TripletCollator(processing_class.pad_token_id, args.max_length)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=collator, **kwargs)
        # compute_loss returns a per-batch mean: let Trainer divide it by the accumulation steps (every version)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    @staticmethod
    def _tokenize(dataset, tokenizer, args: TSPINConfig, name: str = "train_dataset"):
        columns = set(dataset.column_names or [])
        if not {"prompt", *FIELDS} <= columns:
            raise ValueError(f"{name}: expected columns prompt, real, generated, proto, got {sorted(columns)}")
        dataset = dataset.map(tokenize_triplet, remove_columns=sorted(columns), desc="Tokenizing triplets",
                              fn_kwargs={"tokenizer": tokenizer, "max_length": args.max_length,
                                         "max_prompt_length": args.max_prompt_length})
        if args.max_length is None:
            return dataset
        # a prompt that fills max_length leaves no completion token to train on (TRL drops these too)
        kept = dataset.filter(lambda ex: all(len(ex["prompt_ids"]) + ex[f"{k}_prompt_len"] < args.max_length
                                             for k in FIELDS), desc="Dropping too-long prompts")
        if len(dataset) and not len(kept):
            lengths = [len(ex["prompt_ids"]) + max(ex[f"{k}_prompt_len"] for k in FIELDS) for ex in dataset]
            longest, shortest = max(lengths), min(lengths)
            raise ValueError(f"{name}: every one of its {len(dataset)} prompts has at least max_length="
                             f"{args.max_length} tokens ({shortest} to {longest}), so no completion token is left "
                             "to train on; raise max_length or shorten the prompts")
        return kept

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = LossSpec("tspin", alpha=self.args.alpha, beta=self.args.beta, fused=self.args.fused)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                    loss_spec=spec)
        loss = out.loss
        real, generated, proto = out.sequence_logps.detach().chunk(3)
        self._log_metrics(real, generated, proto)
        return (loss, out) if return_outputs else loss

    def _log_metrics(self, real, generated, proto) -> None:
        mode = "train" if self.model.training else "eval"
        real, generated, proto = self.accelerator.gather_for_metrics((real, generated, proto))
        for key, v in tspin_metrics(real, generated, proto, alpha=self.args.alpha).items():  # tspin's own metrics
            self._metrics[mode][key].append(v.item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, *args, **kwargs)
