"""torchrun worker for tests/test_trl_distributed.py: trl.DPOTrainer and FusedDPOTrainer, each trained for two
steps under DDP (gloo, CPU) from the same weights and data; rank 0 saves each run's logs and final weights."""

from __future__ import annotations

import copy
import os
import sys

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from tests._trl_tiny import char_tokenizer, preference_rows, tiny_model
from tspin_kernels.integrations.trl import FusedDPOTrainer


def main(out: str) -> None:
    torch.set_num_threads(1)
    tok = char_tokenizer()
    results = {}
    for name, cls in (("trl", DPOTrainer), ("fused", FusedDPOTrainer)):
        policy = tiny_model(tok, seed=0)
        ref = copy.deepcopy(policy)
        with torch.no_grad():  # the policy starts away from the reference, so that rewards are not all zero
            for p in policy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        calls = []  # TRL's own fused path reads the head's weight; ours calls the head module
        policy.lm_head.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        args = DPOConfig(output_dir=os.path.join(out, name), per_device_train_batch_size=2, max_steps=2,
                         use_cpu=True, bf16=False, ddp_backend="gloo", optim="sgd", learning_rate=0.1,
                         max_grad_norm=0.0, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
                         seed=0, beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])
        trainer = cls(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_dict(preference_rows(8)),
                      processing_class=tok)
        trainer.train()
        results[name] = {"logs": trainer.state.log_history, "world": trainer.accelerator.num_processes,
                         "head_calls": len(calls),
                         "weights": {k: v.detach().clone() for k, v in policy.state_dict().items()}}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    # end the process group both ranks still hold (accelerate started it): left to the interpreter's exit, gloo's
    # threads were once torn down mid-exit ("terminate called without an active exception", SIGABRT on rank 0)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
