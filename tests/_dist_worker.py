"""torchrun worker for tests/test_distributed.py: `torchrun --nproc_per_node 2 -m tests._dist_worker OUT_DIR REF_CKPT`.

Runs every scenario in one process group (one launch keeps the suite fast) and writes rank 0's results to
OUT_DIR/results.pt; the test compares them with the same computation in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests._hf_tiny import packed, tiny_llama, triplet_batch, triplet_rows, tspin_step_loss
from tspin.checkpoint import load_checkpoint, model_state_dict, optimizer_state_dict, save_checkpoint
from tspin.generation import sharded_generate
from tspin.models import apply_lora, enable_gradient_checkpointing, load_for_training
from tspin.ranks import all_sum, cleanup_distributed, init_distributed
from tspin.wrapping import clip_grad_norm, grad_sync, policy_of, wrap_model

NUM_TRIPLETS = 4
LR = 0.5
MOMENTUM = 0.9


def _full_grads(policy) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in policy_of(policy).model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = g.detach().cpu().clone()
    return out


def _gather_logps(logps: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(logps) for _ in range(world)]
    dist.all_gather(parts, logps.detach().contiguous())
    return torch.stack(parts)  # (world, rows of a rank)


def step(info, strategy: str, *, layout: str = "padded", lora: bool = False, checkpointing: bool = False,
         tied: bool = False):
    """One T-SPIN SGD step on this rank's share of the global batch; returns what the test compares."""
    model = tiny_llama(0, tie_word_embeddings=tied)
    if lora:
        model = apply_lora(model, r=4, alpha=8)
        with torch.no_grad():  # B=0 at init would make the adapters a no-op for the gradient check
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    if checkpointing:
        enable_gradient_checkpointing(model)
    policy = wrap_model(model, strategy, info=info)
    policy.train()
    per_rank = NUM_TRIPLETS // info.world_size
    rows = triplet_rows(triplet_batch(NUM_TRIPLETS), list(range(info.rank * per_rank, (info.rank + 1) * per_rank)))
    if layout == "packed":
        rows = packed(rows)
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    if layout == "packed":
        loss, logps = tspin_step_loss(policy, rows)
        loss.backward()
    else:  # two micro-batches of one triplet each, the first without gradient sync
        half = per_rank // 2
        parts = [triplet_rows(rows, list(range(half))), triplet_rows(rows, list(range(half, per_rank)))]
        losses, logps_parts = [], []
        for i, part in enumerate(parts):
            with grad_sync(policy, enabled=i == len(parts) - 1):
                loss_i, logps_i = tspin_step_loss(policy, part)
                (loss_i * half / per_rank).backward()
            losses.append(loss_i.detach() * half / per_rank)
            logps_parts.append(logps_i.detach().reshape(3, -1))
        loss, logps = sum(losses), torch.cat(logps_parts, dim=1).reshape(-1)  # back to [real; gen; proto]
    grads = _full_grads(policy)
    grad_norm = float(clip_grad_norm(policy, None))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": float(all_sum(loss.detach().float()) / info.world_size),
            "logps": _gather_logps(logps, info.world_size), "grads": grads,
            "params": model_state_dict(policy), "optim": optimizer_state_dict(policy, opt),
            "grad_norm": grad_norm}, policy, opt


def resume(info, strategy: str, policy, opt, path: Path) -> dict:
    """A checkpoint with the optimizer, loaded into a fresh policy (other weights) and a fresh optimizer: what a
    resumed run gets back."""
    save_checkpoint(path, policy, optimizer=opt, state={"step": 1})
    fresh = wrap_model(tiny_llama(123), strategy, info=info)
    fresh_opt = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    state = load_checkpoint(path, fresh, optimizer=fresh_opt)
    return {"state": state, "params": model_state_dict(fresh), "optim": optimizer_state_dict(fresh, fresh_opt)}


def main(out_dir: str, ref_ckpt: str) -> None:
    info = init_distributed()
    out = Path(out_dir)
    results: dict = {"world_size": info.world_size}
    results["ddp"], ddp, ddp_opt = step(info, "ddp")
    results["ddp_resumed"] = resume(info, "ddp", ddp, ddp_opt, out / "ckpt_ddp")
    results["fsdp2"], policy, opt = step(info, "fsdp2")
    results["fsdp2_resumed"] = resume(info, "fsdp2", policy, opt, out / "ckpt_fsdp2_state")
    save_checkpoint(out / "ckpt_fsdp2", policy)

    # Generation sharded over ranks, under FSDP2 (each forward is a collective): 5 prompts over 2 ranks.
    prompts = [[1, 5 + i, 7 + 2 * i, 9][: 2 + i % 3] for i in range(5)]
    hf = policy_of(policy)

    def gen(batch):
        outs = []
        for p in batch:
            ids = torch.tensor([p])
            g = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4 + len(p),
                            do_sample=False, pad_token_id=0)
            outs.append(g[0, ids.shape[1]:].tolist())
        return outs

    policy.eval()
    with torch.no_grad():
        results["generated"] = sharded_generate(prompts, gen)
    results["prompts"] = prompts
    results["rank_tags"] = sharded_generate(list(range(7)), lambda xs: [(x, info.rank) for x in xs])

    results["fsdp2_lora_gc_packed"], *_ = step(info, "fsdp2", layout="packed", lora=True, checkpointing=True)
    results["fsdp2_tied"], *_ = step(info, "fsdp2", tied=True)

    # A checkpoint written by one process, loaded into a 2-rank FSDP2 model.
    fresh = wrap_model(tiny_llama(123), "fsdp2", info=info)
    load_checkpoint(ref_ckpt, fresh)
    results["loaded"] = model_state_dict(fresh)

    # Rank 0 reads a checkpoint, the other ranks start on the meta device.
    probe = triplet_rows(triplet_batch(NUM_TRIPLETS), list(range(NUM_TRIPLETS)))
    for strategy in ("fsdp2", "ddp"):
        wrapped = load_for_training(ref_ckpt, strategy, info=info)
        with torch.no_grad():
            results[f"rank0_load_{strategy}_logps"] = _gather_logps(wrapped(**probe), info.world_size)
        results[f"rank0_load_{strategy}_params"] = model_state_dict(wrapped)

    if info.is_main:
        torch.save(results, out / "results.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:3])
