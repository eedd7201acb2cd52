"""A run's :class:`~tspin.config.Config` turned into what each module below the recipes takes, in one place.

The recipes (:mod:`tspin.selfplay`: train, iterate, generate) read the config; the training loop, the policy's
loading, sampling, evaluation and an iteration's data take small settings of their own (``TrainSettings``,
``LoadSettings``, ``SamplingSettings``, ...), built here. A settings field named like a config key holds that key's
value; the rest is what the recipes decide from several keys (greedy evaluation, the rows' layout, vLLM's engine).
"""

from __future__ import annotations

import dataclasses

from .batch import fields_for, rows_layout
from .config import Config
from .data import Tokenization
from .generation import SamplingSettings
from .iteration_data import IterationSettings
from .losses import LogpSettings
from .models import LoadSettings
from .train import TrainSettings


def _pick(cls, cfg: Config, **decided):
    """``cls`` from the config keys named like its fields; ``decided``: the fields the recipe works out."""
    keys = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name not in decided}
    return cls(**keys, **decided)


def train_settings(cfg: Config) -> TrainSettings:
    return _pick(TrainSettings, cfg, fused_loss=cfg.fused_loss_option())


def load_settings(cfg: Config) -> LoadSettings:
    """The policy's: attention chosen for the rows this method trains on (shared_prefix with one row per example is
    packed)."""
    targets = cfg.lora_target_modules_list()
    return _pick(LoadSettings, cfg, lora_target_modules=targets if isinstance(targets, str) else tuple(targets),
                 layout=rows_layout(cfg.layout, len(fields_for(cfg.method, cfg.no_history))))


def tokenization(cfg: Config) -> Tokenization:
    return Tokenization(template=cfg.prompt_template, max_length=cfg.max_length,
                        max_prompt_length=cfg.max_prompt_length, truncated_samples=cfg.truncated_samples)


def engine_options(cfg: Config) -> dict:
    """tspin.generation.vllm_engine.EngineOptions fields (backend vllm)."""
    return dict(base_model=cfg.model_name_or_path, lora_rank=cfg.lora_rank, bf16=cfg.bf16, device=cfg.device,
                gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)


def sampling(cfg: Config) -> SamplingSettings:
    """How y', the proto y0 and `tspin generate`'s column are sampled."""
    return SamplingSettings(template=cfg.prompt_template, max_prompt_length=cfg.max_prompt_length,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, batch_size=cfg.generation_batch_size, progress=cfg.progress,
                            backend=cfg.generation_backend, engine=engine_options(cfg))


def evaluation(cfg: Config) -> dict:
    """tspin.evaluation.evaluate's settings: greedy answers (eval_max_new_tokens, else max_new_tokens) in batches
    of eval_batch_size, scored as sums, exact match as eval_answer_pattern says."""
    greedy = dataclasses.replace(sampling(cfg), max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                 temperature=0.0, top_p=1.0, top_k=0, batch_size=cfg.eval_batch_size)
    scoring = LogpSettings(batch_size=cfg.eval_batch_size, impl=cfg.loss_impl, layout=cfg.layout, bf16=cfg.bf16)
    return dict(sampling=greedy, tokenization=tokenization(cfg), scoring=scoring,
                answer_pattern=cfg.eval_answer_pattern)


def reference_scoring(cfg: Config) -> LogpSettings:
    """SPIN's reference log-probs: as the loss reads them (sums, or means with average_logps)."""
    return LogpSettings(batch_size=cfg.eval_batch_size, impl=cfg.loss_impl, average=cfg.average_logps,
                        layout=cfg.layout, bf16=cfg.bf16, progress=cfg.progress)


def iteration_settings(cfg: Config) -> IterationSettings:
    return _pick(IterationSettings, cfg, initial_policy=cfg.model_name_or_path, sampling=sampling(cfg),
                 tokenization=tokenization(cfg), scoring=reference_scoring(cfg))
