"""One flat dataclass for every command: YAML recipe + `--key=value` overrides, validated with clear errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METHODS = ("tspin", "spin", "sft")
OPTIMIZERS = ("adamw", "rmsprop")
SCHEDULERS = ("linear", "cosine", "constant")
LAYOUTS = ("padded", "packed")
STRATEGIES = ("none", "ddp", "fsdp2")  # = tspin.distributed.STRATEGIES (not imported: config stays torch-free)


def _f(default, help: str, **kw):  # noqa: A002 - "help" reads best in the declarations below
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # --- model and data
    model_name_or_path: str = _f("", "Hugging Face model id or local dir of the initial policy (pi_0 for self-play).")
    tokenizer_name_or_path: str | None = _f(None, "Tokenizer dir/id; defaults to model_name_or_path.")
    data_path: str = _f("", "Training data: JSONL, JSON, Parquet or a saved `datasets` dir (SPEC section 4).")
    data_split: str = _f("train", "Split to use when data_path is a DatasetDict dir.")
    eval_data_path: str | None = _f(None, "Held-out prompts with reference answers; else `eval_size` rows are "
                                          "split off data_path.")
    eval_size: int = _f(0, "Rows split off data_path for evaluation when eval_data_path is not given (0: no eval).")
    data_fraction: float | None = _f(None, "Seeded subset of the training data by fraction in (0, 1] (the '25%' run).")
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
    no_history: bool = _f(False, "Ablation: T-SPIN without the history term (beta = 0 throughout).")
    spin_lambda: float = _f(0.1, "SPIN lambda (the kernels' `beta` argument of spin_loss).")
    spin_mix_previous: bool = _f(False, "SPIN: train iteration t on the synthetic data of iterations t-1 and t.")
    average_logps: bool = _f(False, "Length-averaged log-probs instead of sums (SPEC option, not the default).")
    loss_impl: str = _f("auto", "tspin_kernels impl: auto | triton | torch | reference.")
    layout: str = _f("padded", "Batch layout: padded rows, or packed padding-free rows with cu_seqlens/position_ids.")
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
    generation_batch_size: int = _f(16, "Prompts per generate() call.")
    # --- evaluation
    eval_max_new_tokens: int | None = _f(None, "Greedy tokens per held-out answer; defaults to max_new_tokens.")
    eval_batch_size: int = _f(32, "Prompts per evaluation batch.")
    # --- bookkeeping
    output_dir: str = _f("runs/tspin", "Where models, generated data, checkpoints and metrics go.")
    seed: int = _f(42, "Seed of init-free randomness: data order, sampling.")
    save_steps: int = _f(0, "Also checkpoint every N optimizer steps (0: only at the end of each iteration).")
    save_total_limit: int = _f(1, "Mid-iteration checkpoints kept.")
    logging_steps: int = _f(1, "Write a metrics line every N optimizer steps.")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N.")
    progress: bool = _f(True, "Show tqdm progress bars.")

    # ------------------------------------------------------------------
    def validate(self) -> Config:
        def bad(name, msg):
            raise ValueError(f"config: {name}={getattr(self, name)!r}: {msg}")

        choices = {"method": METHODS, "optimizer": OPTIMIZERS, "lr_scheduler": SCHEDULERS, "layout": LAYOUTS,
                   "loss_impl": ("auto", "triton", "torch", "reference"), "strategy": STRATEGIES}
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
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "must be in [0, 1)")
        if self.learning_rate <= 0:
            bad("learning_rate", "must be > 0")
        if self.num_train_epochs <= 0:
            bad("num_train_epochs", "must be > 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            bad("max_grad_norm", "must be > 0 or null")
        return self

    def lora_target_modules_list(self) -> str | list[str]:
        """peft's target_modules: the string 'all-linear' or a list of module names."""
        names = [n.strip() for n in self.lora_target_modules.split(",") if n.strip()]
        return "all-linear" if names == ["all-linear"] else names

    def beta_at(self, iteration: int) -> float:
        if self.no_history:
            return 0.0
        if iteration == 0 and self.beta_iter0 is not None:
            return self.beta_iter0
        return self.beta

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _target_type(name: str):
    hint = typing.get_type_hints(Config)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    return (args[0] if args else hint), optional


def coerce(name: str, value, source: str = "override"):
    """Convert a YAML value or a command-line string to the field's type, or raise naming the key."""
    if name not in FIELDS:
        close = [k for k in FIELDS if name.split("_")[0] in k][:5]
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise ValueError(f"{source}: unknown config key {name!r}{hint}; see `tspin <command> --help`")
    typ, optional = _target_type(name)
    if isinstance(value, str):
        low = value.strip().lower()
        if optional and low in ("none", "null", "~", ""):
            return None
        if typ is bool:
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{source}: {name}={value!r}: expected a boolean (true/false)")
        if typ in (int, float):
            try:
                return typ(float(value)) if typ is int and float(value).is_integer() else typ(value)
            except ValueError:
                raise ValueError(f"{source}: {name}={value!r}: expected {typ.__name__}") from None
        return value
    if value is None:
        if optional:
            return None
        raise ValueError(f"{source}: {name}: null is not allowed")
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{source}: {name}={value!r}: expected {typ.__name__}, got {type(value).__name__}")
    return value


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: expected a mapping of config keys, got {type(raw).__name__}")
        for k, v in raw.items():
            values[k] = coerce(k, v, source=str(p))
    for k, v in (overrides or {}).items():
        values[k] = coerce(k, v)
    return Config(**values).validate()


def save_config(cfg: Config, path: Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
