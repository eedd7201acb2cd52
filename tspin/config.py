"""The run's configuration: one flat dataclass for every command, with help text and validation, read from a YAML
recipe plus `--key=value` overrides by transformers' HfArgumentParser (argparse built from the dataclass)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .choices import GENERATION_BACKENDS, LAYOUTS, STRATEGIES, TRUNCATED_SAMPLES
from .methods import METHODS

OPTIMIZERS = ("adamw", "rmsprop")
SCHEDULERS = ("linear", "cosine", "constant")
# "auto" or an attention implementation transformers knows (varlen_sdpa: tspin_kernels.integrations registers it)
ATTN_IMPLEMENTATIONS = ("auto", "varlen_sdpa", "sdpa", "eager", "flex_attention", "flash_attention_2")
FUSED_LOSS = ("auto", "true", "false")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def _f(default, help: str, **kw):  # noqa: A002 - "help" reads best in the declarations below
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # --- model and data
    model_name_or_path: str = _f("", "Hugging Face model id or local dir of the initial policy (pi_0 for self-play).")
    tokenizer_name_or_path: str | None = _f(None, "Tokenizer dir/id; defaults to model_name_or_path.")
    data_path: str = _f("", "Training data: JSONL, JSON, Parquet or a saved `datasets` dir (README "
                                   "'Data formats').")
    data_split: str = _f("train", "Split to use when data_path is a DatasetDict dir.")
    eval_data_path: str | None = _f(None, "Held-out prompts with reference answers; else `eval_size` rows are "
                                          "split off data_path.")
    eval_size: int = _f(0, "Rows split off data_path for evaluation when eval_data_path is not given (0: no eval).")
    data_fraction: float | None = _f(None, "Seeded subset of the training data by fraction in (0, 1] (0.25: the "
                                                  "paper's 25 percent run).")
    data_count: int | None = _f(None, "Seeded subset of the training data by count (exclusive with data_fraction).")
    data_seed: int = _f(0, "Seed of the subset / held-out split (independent of `seed`).")
    prompt_template: str = _f("paper", "'paper' (### Instruction: ...), 'chat' (tokenizer chat template) or a "
                                       "format string containing {prompt}.")
    max_length: int = _f(2048, "Max prompt+response tokens; the response is cut at the end to fit.")
    max_prompt_length: int = _f(1024, "Max prompt tokens; longer prompts keep their last tokens (left truncation).")
    # --- method
    method: str = _f("tspin", "tspin | spin | sft.")
    alpha: float = _f(1.0, "T-SPIN entropy coefficient (scales both advantages).")
    beta: float = _f(0.1, "T-SPIN weight of the historical advantage.")
    beta_iter0: float | None = _f(0.0, "beta at iteration 0 (y' and y0 come from the same policy); null: use beta.")
    no_history: bool = _f(False, "Ablation: T-SPIN without the history term (beta = 0 throughout). It never reads the "
                                 "proto y0: examples are pairs (y, y'), and y0 is sampled only to serve as y' at "
                                 "iteration 0 (reuse_proto_at_iter0).")
    spin_lambda: float = _f(0.1, "SPIN lambda (the kernels' `beta` argument of spin_loss).")
    spin_mix_previous: bool = _f(False, "SPIN: train iteration t on the synthetic data of iterations t-1 and t.")
    average_logps: bool = _f(False, "Length-averaged log-probs instead of sums (an option; the method sums).")
    loss_impl: str = _f("auto", "tspin_kernels impl: auto | triton | torch | reference.")
    fused_loss: str = _f("auto", "tspin, spin: form the LM head's gradients inside the loss's forward, one chunk of "
                                 "whole triplets (pairs) at a time: 3 passes over the head instead of 4. auto: as "
                                 "tspin_kernels decides (fused on CUDA and with the torch path, the fastest "
                                 "measured); true: always (not with loss_impl reference); false: log-probs with "
                                 "their own backward, then the loss on them.")
    layout: str = _f("padded", "Batch layout: padded rows; packed padding-free rows with cu_seqlens/position_ids; "
                               "shared_prefix (tspin, spin): each prompt runs through the backbone once for all "
                               "its responses, exactly (needs varlen_sdpa, sdpa, eager or flex_attention; sft uses "
                               "packed).")
    attn_implementation: str = _f("auto", "The policy's attention: auto | varlen_sdpa | sdpa | eager | "
                                          "flex_attention | flash_attention_2. auto: transformers' default (sdpa) "
                                          "for padded rows; for packed and shared_prefix rows one whose cost is the "
                                          "sum of the sequences' attention, not the square of the row: "
                                          "flash_attention_2 for packed where flash-attn is installed (CUDA), else "
                                          "varlen_sdpa (sdpa per bucket of equal sequences). The choice is in every "
                                          "metrics line (attn_implementation).")
    # --- self-play
    num_iterations: int = _f(4, "Self-play iterations (Iter0..Iter{n-1}).")
    proto_path: str | None = _f(None, "Existing proto-synthetic file to reuse instead of generating one.")
    reuse_proto_at_iter0: bool = _f(True, "Iteration 0's synthetic responses are the proto ones (both come from pi_0).")
    # --- optimisation
    num_train_epochs: float = _f(1.0, "Epochs over the data per iteration (fractions allowed).")
    per_device_train_batch_size: int = _f(8, "Examples (triplets / pairs / sequences) per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float = _f(5e-7, "Peak learning rate.")
    optimizer: str = _f("rmsprop", "adamw | rmsprop.")
    weight_decay: float = _f(0.0, "Decoupled weight decay (AdamW) / L2 (RMSProp).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    rmsprop_alpha: float = _f(0.99, "RMSProp smoothing constant.")
    lr_scheduler: str = _f("linear", "linear | cosine | constant (after warmup).")
    warmup_ratio: float = _f(0.1, "Fraction of each iteration's optimizer steps spent warming up.")
    max_grad_norm: float | None = _f(1.0, "Gradient clipping norm; null disables.")
    bf16: bool = _f(True, "bf16 autocast on GPU (ignored on CPU).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    disable_dropout: bool = _f(True, "Set every dropout probability of the policy to 0 while training (as TRL does): "
                                     "its log-probs are then those of eval mode, where generation, evaluation and "
                                     "SPIN's reference log-probs are computed. false keeps the model's dropout.")
    # --- scale-out (README "Scaling")
    strategy: str = _f("none", "none | ddp | fsdp2: how each process holds the model. ddp/fsdp2 need a launcher "
                               "(torchrun / accelerate launch); every rank trains on its share of each step "
                               "and uses its own device (`device` applies to 'none').")
    lora_rank: int = _f(0, "LoRA adapter rank (0: full fine-tuning). The LM head and every base weight stay frozen; "
                           "checkpoints then hold the adapter only.")
    lora_alpha: float = _f(32.0, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank).")
    lora_target_modules: str = _f("all-linear", "LoRA targets: 'all-linear' (every linear layer but the LM head) or "
                                                "comma-separated module names such as q_proj,v_proj.")
    # --- generation
    temperature: float = _f(1.0, "Sampling temperature for synthetic/proto responses (0: greedy).")
    top_p: float = _f(1.0, "Nucleus sampling p.")
    top_k: int = _f(0, "Top-k sampling (0: off; transformers would otherwise apply its default of 50).")
    max_new_tokens: int = _f(256, "New tokens per generated response.")
    truncated_samples: str = _f("keep_without_eos", "What training does with a y' / y0 cut at max_new_tokens (no "
                                                    "stop token): keep_without_eos (train on the tokens sampled, "
                                                    "nothing appended), drop (leave its example out of the "
                                                    "iteration) or append_eos (end it with EOS as if it had "
                                                    "finished). The files record <field>_truncated.")
    generation_batch_size: int = _f(16, "Prompts per generate() call (backend hf; vLLM schedules its own batches).")
    generation_backend: str = _f("hf", "hf | vllm: who samples the proto, each iteration's y' and evaluation's greedy "
                                       "answers. vllm needs the extra: pip install 'tspin[vllm]' (README "
                                       "'Fast sampling with vLLM'); it samples from the saved policy directories.")
    vllm_gpu_memory_utilization: float = _f(0.45, "vllm on GPU: fraction of the GPU's memory the engine may take "
                                                  "(weights + KV cache) next to the trainer; the engine sleeps "
                                                  "between uses. In (0, 1].")
    # --- evaluation
    eval_max_new_tokens: int | None = _f(None, "Greedy tokens per held-out answer; defaults to max_new_tokens.")
    eval_batch_size: int = _f(32, "Prompts per evaluation batch.")
    eval_answer_pattern: str | None = _f(None, "Regular expression: exact match compares the lists of its matches "
                                               "in the answer and the reference (re.findall), so that what stands "
                                               "between them is free; e.g. '-?\\d+' compares only the numbers. "
                                               "None: the whole texts, whitespace runs collapsed.")
    # --- bookkeeping
    output_dir: str = _f("runs/tspin", "Where models, generated data, checkpoints and metrics go.")
    seed: int = _f(42, "Seed of init-free randomness: data order, sampling.")
    save_steps: int = _f(0, "Also checkpoint every N optimizer steps (0: only at the end of each iteration).")
    save_total_limit: int = _f(1, "Mid-iteration checkpoints kept.")
    logging_steps: int = _f(1, "Write a metrics line every N optimizer steps.")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N.")
    progress: bool = _f(True, "Show tqdm progress bars.")

    def __post_init__(self):
        if isinstance(self.fused_loss, (bool, str)):  # YAML's true / false arrive as True / False
            self.fused_loss = str(self.fused_loss).strip().lower()

    # ------------------------------------------------------------------
    def validate(self) -> Config:
        def bad(name, msg):
            raise ValueError(f"config: {name}={getattr(self, name)!r}: {msg}")

        # first: nan passes every comparison below (nan < 0 is False), and inf or a value beyond float32's range
        # turns the float32 weights, loss or sampling into inf/nan
        for name, value in self.to_dict().items():
            if isinstance(value, float) and not abs(value) <= FLOAT32_MAX:
                bad(name, "must be a finite number (within float32's range, |x| <= 3.4e38)")
        choices = {"method": METHODS, "optimizer": OPTIMIZERS, "lr_scheduler": SCHEDULERS, "layout": LAYOUTS,
                   "loss_impl": ("auto", "triton", "torch", "reference"), "strategy": STRATEGIES,
                   "fused_loss": FUSED_LOSS, "generation_backend": GENERATION_BACKENDS,
                   "truncated_samples": TRUNCATED_SAMPLES, "attn_implementation": ATTN_IMPLEMENTATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, f"expected one of {', '.join(allowed)}")
        if self.prompt_template not in ("paper", "chat") and "{prompt}" not in self.prompt_template:
            bad("prompt_template", "expected 'paper', 'chat' or a format string containing {prompt}")
        if self.data_fraction is not None and self.data_count is not None:
            bad("data_fraction", "give data_fraction or data_count, not both")
        if self.data_fraction is not None and not 0 < self.data_fraction <= 1:
            bad("data_fraction", "must be in (0, 1]")
        for name in ("data_count",):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("max_length", "max_prompt_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "max_new_tokens", "generation_batch_size", "eval_batch_size", "num_iterations", "logging_steps",
                     "save_total_limit"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.max_prompt_length >= self.max_length:
            bad("max_prompt_length", f"must be < max_length ({self.max_length}) to leave room for the response")
        for name in ("eval_size", "save_steps", "weight_decay", "alpha", "beta", "spin_lambda", "temperature", "top_k"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        from tspin_kernels._options import MAX_LOSS_SCALE, check_real  # the kernels' own rule for loss scales

        for name in ("alpha", "beta", "beta_iter0", "spin_lambda"):
            try:
                check_real(name, getattr(self, name) if getattr(self, name) is not None else 0.0)
            except ValueError:
                bad(name, f"must be <= {MAX_LOSS_SCALE:g} (a larger loss scale overflows the float32 loss)")
        if not self.output_dir.strip():
            bad("output_dir", "must name a directory (an empty value would be the current directory)")
        if self.lora_rank < 0:
            bad("lora_rank", "must be >= 0 (0 disables LoRA)")
        if self.lora_rank and self.lora_alpha <= 0:
            bad("lora_alpha", "must be > 0")
        if self.lora_rank and not self.lora_target_modules_list():
            bad("lora_target_modules", "expected 'all-linear' or comma-separated module names")
        if self.beta_iter0 is not None and self.beta_iter0 < 0:
            bad("beta_iter0", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            bad("vllm_gpu_memory_utilization", "must be in (0, 1]")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "must be in [0, 1)")
        if self.learning_rate <= 0:
            bad("learning_rate", "must be > 0")
        if self.num_train_epochs <= 0:
            bad("num_train_epochs", "must be > 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            bad("max_grad_norm", "must be > 0 or null")
        for name in ("adam_beta1", "adam_beta2", "rmsprop_alpha"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1)")
        if self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 1:
            bad("eval_max_new_tokens", "must be >= 1 or null")
        if self.eval_answer_pattern is not None:
            try:
                if re.compile(self.eval_answer_pattern).match("") is not None:
                    bad("eval_answer_pattern", "must not match the empty string (every answer would match it)")
            except re.error as e:
                bad("eval_answer_pattern", f"is not a regular expression ({e})")
        for name in ("seed", "data_seed"):
            if not 0 <= getattr(self, name) < 2**32:
                bad(name, "must be in [0, 2**32)")
        if not DEVICE.fullmatch(self.device):
            bad("device", "expected auto, cpu, cuda or cuda:N")
        try:  # the kernels' own rule (tspin_kernels decides the loss path), checked before any work starts
            from tspin_kernels._defaults import resolve_path

            resolve_path("cpu", impl=self.loss_impl, fused=self.fused_loss_option())
        except ValueError as e:
            bad("fused_loss", f"with loss_impl={self.loss_impl!r}: {e}")
        if self.attn_implementation == "flash_attention_2" and self.layout == "shared_prefix" and self.method != "sft":
            bad("attn_implementation", "the shared_prefix layout needs an attention that takes its mask (varlen_sdpa, "
                                       "sdpa, eager or flex_attention); flash-attention knows causal and packed rows")
        return self

    def fused_loss_option(self) -> bool | None:
        """``fused_loss`` as tspin_kernels' ``fused=`` argument: None (auto), True or False."""
        return {"auto": None, "true": True, "false": False}[self.fused_loss]

    def lora_target_modules_list(self) -> str | list[str]:
        """peft's target_modules: the string 'all-linear' or a list of module names."""
        names = [n.strip() for n in self.lora_target_modules.split(",") if n.strip()]
        return "all-linear" if names == ["all-linear"] else names

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _optional(name: str) -> bool:
    hint = typing.get_type_hints(Config)[name]
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _unknown_key(name: str, source: str) -> ValueError:
    close = difflib.get_close_matches(name, FIELDS, n=3)
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    return ValueError(f"{source}: unknown config key {name!r}{hint}; see `tspin <command> --help`")


def _nullable(convert):
    """An Optional key's argparse type: 'null' / 'none' (as in YAML) means None."""
    def parse(text: str):
        return None if text.strip().lower() in ("null", "none", "~") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse's message: "invalid float value: 'x'"
    return parse


def config_keys() -> argparse.ArgumentParser:
    """A parent parser (argparse's ``parents=``) with one ``--key`` option per Config field, its help text and
    default, built by HfArgumentParser from the dataclass; optional keys also take ``null``."""
    from transformers import HfArgumentParser

    keys = HfArgumentParser(Config, add_help=False, allow_abbrev=False)
    for action in keys._actions:
        if action.option_strings[0] == f"--no_{action.dest}":  # HfArgumentParser's --no_<flag>: --<flag>=false
            action.help = argparse.SUPPRESS
        elif _optional(action.dest):
            action.type = _nullable(action.type)
    return keys


def read_yaml(path: str | Path) -> dict[str, str | None]:
    """A YAML recipe as argparse defaults: every value as the text a command line would give (so both go through
    the same conversion and checks), null kept for optional keys."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not valid UTF-8 (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: expected a mapping of config keys, got {type(raw).__name__}")
    values: dict[str, str | None] = {}
    for k, v in raw.items():
        if k not in FIELDS:
            raise _unknown_key(str(k), str(p))
        if v is None and not _optional(k):
            raise ValueError(f"{p}: {k}: null is not allowed")
        if isinstance(v, (list, dict)):
            raise ValueError(f"{p}: {k}: expected a single value, got a {type(v).__name__}")
        values[k] = None if v is None else str(v)
    return values


def config_from_args(namespace: argparse.Namespace, rest: list[str]) -> Config:
    """The validated Config from a parsed namespace; ``rest`` (what argparse did not recognise) must be empty."""
    for arg in rest:
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r} (config overrides look like --key=value)")
        raise _unknown_key(arg[2:].partition("=")[0].replace("-", "_"), "override")
    return Config(**{name: getattr(namespace, name) for name in FIELDS}).validate()


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Config from a YAML recipe and ``{key: value}`` overrides (values as on the command line, e.g. "2e-5")."""
    parser = argparse.ArgumentParser(parents=[config_keys()], allow_abbrev=False, exit_on_error=False)
    if path is not None:
        parser.set_defaults(**read_yaml(path))
    args = [f"--{k}={v}" for k, v in (overrides or {}).items()]
    return config_from_args(*parser.parse_known_args(args))


def save_config(cfg: Config, path: Path) -> None:
    from .io import atomic_write_yaml

    atomic_write_yaml(path, cfg.to_dict())
