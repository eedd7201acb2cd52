"""Sampling responses from a policy: Hugging Face ``generate`` or vLLM, batched, seeded, resumable, sharded over
the ranks under torchrun.

- :mod:`.sampling`: the entry points (:func:`generate_samples` picks the backend, :func:`generate_field` writes a
  sampled field into a record file) and the Hugging Face backend.
- :mod:`.samples`: what both backends share (a :class:`Sample`, the resumable ``.partial`` file, rank sharding).
- :mod:`.vllm_backend`, :mod:`.vllm_engine`, :mod:`.vllm_worker`: the vLLM backend, its engine (start, in-place
  weight hand-off, sleep between uses) and the extension that runs inside vLLM's worker.
"""

from .samples import Sample, partial_path, sharded_generate
from .sampling import (
    BACKENDS,
    SamplingSettings,
    check_backend,
    generate_field,
    generate_samples,
    generate_texts,
)

__all__ = ["BACKENDS", "Sample", "SamplingSettings", "check_backend", "generate_field", "generate_samples",
           "generate_texts", "partial_path", "sharded_generate"]
