"""Peak host memory (RSS) of one DPO training step through TRL's DPOTrainer or FusedDPOTrainer (with or without
TRL's logit metrics), measured in this (fresh) process.

    python -m benchmarks.trl_rss_probe --trainer trl|fused|fused-no-logit-metrics \
        [--vocab 128256 --hidden 64 --layers 2 --pairs 2 --length 1024]

Prints one JSON line: ``{"trainer", "baseline_rss", "peak_rss", "rise_bytes", "seconds", "loss", "grad_norm", ...}``.
A real tiny Llama (built from a config, with a large vocabulary and an untied head) is trained against a frozen
copy of itself as the reference: one training step's loss and backward (policy forward and backward, reference
forward, TRL's loss and metrics), float32, on ``pairs`` preference pairs of about ``length`` tokens, a quarter of
them prompt. The loss and gradient norm let the trainers be checked against each other. The baseline is the
resident set once the trainer and the batch exist; the peak is the kernel's high-water mark over the step (see
``benchmarks.rss_probe``). One trainer per process: the allocator keeps freed memory, so two trainers measured in
one process would disturb each other.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time

from benchmarks.rss_probe import current_rss, peak_rss, reset_peak


def build_trainer(kind: str, *, vocab: int, hidden: int, layers: int, pairs: int, length: int, output_dir: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tests._trl_tiny import char_tokenizer, preference_rows, tiny_model
    from tspin_kernels.integrations.trl import FusedDPOTrainer

    tok = char_tokenizer()
    model = tiny_model(tok, vocab_size=vocab, hidden=hidden, layers=layers)
    ref = copy.deepcopy(model)  # built before the trainer: a frozen reference, as in full DPO fine-tuning
    quarter = length // 4  # one character is one token
    rows = preference_rows(pairs, lo=3 * quarter - 8, hi=3 * quarter - 2, prompt=(quarter - 1, quarter - 1))
    args = DPOConfig(output_dir=output_dir, per_device_train_batch_size=pairs, report_to=[], use_cpu=True,
                     bf16=False, save_strategy="no", disable_tqdm=True, max_length=length + 8)
    kw = dict(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tok)
    if kind == "trl":
        return DPOTrainer(**kw)
    return FusedDPOTrainer(**kw, logit_metrics=kind == "fused")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer", required=True, choices=["trl", "fused", "fused-no-logit-metrics"])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--length", type=int, default=1024)
    a = p.parse_args(argv)

    import tempfile

    import torch
    import trl

    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(a.trainer, vocab=a.vocab, hidden=a.hidden, layers=a.layers, pairs=a.pairs,
                                length=a.length, output_dir=out)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        gc.collect()
        baseline = current_rss()
        ok = reset_peak()
        t0 = time.perf_counter()
        with trainer.compute_loss_context_manager():  # what Trainer.training_step does, without the loop state
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        seconds = time.perf_counter() - t0
        peak = peak_rss(ok)
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    tokens = int(batch["attention_mask"].sum())
    completion = int(batch["completion_mask"].sum())
    res = {
        "trainer": a.trainer, "vocab": a.vocab, "hidden": a.hidden, "layers": a.layers, "pairs": a.pairs,
        "length": a.length, "rows": int(batch["input_ids"].shape[0]), "T": int(batch["input_ids"].shape[1]),
        "tokens": tokens, "completion_tokens": completion, "loss": float(loss), "grad_norm": grad_norm,
        "baseline_rss": baseline, "peak_rss": peak, "rise_bytes": max(0, peak - baseline), "seconds": seconds,
        "method": "VmHWM after clear_refs" if ok else "ru_maxrss", "threads": torch.get_num_threads(),
        "trl": trl.__version__,
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
