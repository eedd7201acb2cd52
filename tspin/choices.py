"""The values a setting may take, in one torch-free place: the config validates against them (it imports nothing
heavier), and the modules below it check their own arguments against the same tuples."""

from __future__ import annotations

LAYOUTS = ("padded", "packed", "shared_prefix")  # how a batch's rows are laid out (tspin.batch)
TRUNCATED_SAMPLES = ("keep_without_eos", "drop", "append_eos")  # what training does with a cut sample (tspin.data)
STRATEGIES = ("none", "ddp", "fsdp2")  # how each process holds the model (tspin.wrapping)
GENERATION_BACKENDS = ("hf", "vllm")  # who samples (tspin.generation)
