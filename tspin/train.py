"""The training loop: one pass of T-SPIN / SPIN / SFT over a tokenized dataset (one self-play iteration).

Read top to bottom: optimizer + schedule, resume from the newest checkpoint, then for every optimizer step the
micro-batches of its accumulation window, clipping, the step, metrics and periodic checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, load_trainer_state, prune_checkpoints, save_checkpoint
from .config import Config
from .data import collate, fields_for
from .distributed import clip_grad_norm, grad_sync, reshard
from .io import atomic_write_json
from .losses import compute_loss
from .metrics import Averager, MetricsWriter
from .ranks import all_sum, on_main, world


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config: device={name!r} but CUDA is not available")
    return dev


def autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model, cfg: Config) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.learning_rate, alpha=cfg.rmsprop_alpha, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer, cfg: Config, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_windows(n: int, cfg: Config, seed: int, world_size: int = 1) -> list[list[list[int]]]:
    """For every optimizer step, its micro-batches of example indices, over all ranks (a micro-batch holds
    per_device_train_batch_size examples per rank). Fixed by (seed, epoch), so the data position of a resumed run
    is simply the step number, and W ranks with batch size b take the steps of one process with batch size W*b."""
    mb = cfg.per_device_train_batch_size * world_size
    per_step = mb * cfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(n / per_step)
    total = max(1, math.ceil(steps_per_epoch * cfg.num_train_epochs))
    windows = []
    for s in range(total):
        epoch, k = divmod(s, steps_per_epoch)
        idx = epoch_order(n, seed, epoch)[k * per_step:(k + 1) * per_step]
        windows.append([idx[i:i + mb] for i in range(0, len(idx), mb)])
    return windows


def rank_share(micro_batch: list[int], rank: int, world_size: int) -> tuple[list[int], float]:
    """(this rank's examples of a global micro-batch, loss weight). A rank left without examples (a short last
    batch) still runs one forward/backward, on a borrowed example with weight 0: DDP and FSDP2 need every rank
    in every collective."""
    mine = micro_batch[rank::world_size]
    return (mine, 1.0) if mine else (micro_batch[:1], 0.0)


def train_loop(model, tokenizer, features: list[dict], cfg: Config, *, method: str, out_dir: str | Path,
               metrics: MetricsWriter, iteration: int = 0, beta: float | None = None, seed: int | None = None,
               desc: str = "train") -> dict:
    """Train `model` in place on `features`; checkpoints go to out_dir/checkpoints, the final one to out_dir/model.

    `model` is the wrapped policy (tspin.distributed.wrap_model / load_for_training) or a plain HF model; under
    torchrun every rank calls this with the same features and trains on its share of each step.

    Resumes from the newest complete checkpoint under out_dir, reaching the same weights as an uninterrupted run.
    Returns the means of the last epoch's metrics (also written to out_dir/train_summary.json).
    """
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    rank, world_size = world()
    fields = fields_for(method)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    beta = cfg.beta_at(iteration) if beta is None else beta
    windows = step_windows(len(features), cfg, cfg.seed + 1000 * iteration if seed is None else seed, world_size)
    total = len(windows)
    optimizer = build_optimizer(reshard(model), cfg)  # FSDP2: the sharded parameters, not a generate()'s gathers
    scheduler = build_scheduler(optimizer, cfg, total)

    start, epoch_avg = 0, Averager()
    ckpt = latest_checkpoint(out_dir / "checkpoints")
    if ckpt is not None:
        state = load_trainer_state(ckpt, model, optimizer=optimizer, scheduler=scheduler)
        if state.get("world_size", 1) != world_size:  # the steps' data split depends on the number of ranks
            raise ValueError(f"--resume: {ckpt} was written by {state.get('world_size', 1)} process(es), this run has "
                             f"{world_size}; resume a mid-iteration checkpoint with the same --nproc_per_node")
        start = state["step"]
        epoch_avg.sums, epoch_avg.n = state.get("epoch_avg", ({}, 0))
        # lines a killed run logged after this checkpoint are written again below
        metrics.rewind(lambda r: not (r.get("phase") == "train" and r.get("iteration") == iteration
                                      and r.get("method") == method and r.get("step", 0) > start))

    model.train()
    steps_per_epoch = math.ceil(len(features) / (cfg.per_device_train_batch_size * world_size
                                                 * cfg.gradient_accumulation_steps))
    bar = tqdm(total=total, initial=start, desc=desc, disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    for step in range(start, total):
        t0 = time.perf_counter()
        shares = [rank_share(mb, rank, world_size) for mb in windows[step]]
        window = [(collate([features[i] for i in mine], fields, pad, cfg.layout), w) for mine, w in shares]
        # exact accumulation: every micro-batch loss is a sum, divided by the whole window's count over all ranks;
        # DDP / FSDP2 average gradients over ranks, hence the factor world_size
        denom = sum(w * (b.num_tokens if method == "sft" else b.num_examples) for b, w in window)
        if world_size > 1:
            denom = all_sum([denom])[0] / world_size
        avg, n_tokens, window_loss = Averager(), 0, 0.0
        for j, (batch, w) in enumerate(window):
            batch = batch.to(device)
            with grad_sync(model, enabled=j == len(window) - 1):  # communicate once per step
                with autocast(device, cfg.bf16):
                    loss, m = compute_loss(model, batch, method=method, alpha=cfg.alpha, beta=beta,
                                           spin_lambda=cfg.spin_lambda, impl=cfg.loss_impl, average=cfg.average_logps)
                (loss / denom if w else loss * 0.0).backward()
            window_loss += w * loss.item() / denom / world_size
            avg.add(m, int(w) * batch.num_examples)
            n_tokens += int(w) * int(batch.input_ids.numel() if batch.attention_mask is None
                                     else batch.attention_mask.sum())
        if world_size > 1:  # the logged numbers are those of the whole step
            keys = sorted(avg.sums)
            sums = all_sum([window_loss, n_tokens, avg.n] + [avg.sums[k] for k in keys])
            window_loss, n_tokens, avg.n = sums[0], int(sums[1]), int(sums[2])
            avg.sums = dict(zip(keys, sums[3:]))
        grad_norm = clip_grad_norm(model, cfg.max_grad_norm)  # global norm over ranks / shards
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        means = {"loss": window_loss, **avg.means()}
        if step // steps_per_epoch == (total - 1) // steps_per_epoch:
            epoch_avg.add(means, avg.n)
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == total:
            metrics.write(phase="train", method=method, iteration=iteration, step=step + 1, total_steps=total,
                          epoch=round((step + 1) / steps_per_epoch, 4), lr=lr, grad_norm=grad_norm, beta=beta,
                          tokens_per_s=n_tokens / dt, **means)
        bar.set_postfix(loss=f"{means['loss']:.4f}", tok_s=f"{n_tokens / dt:.0f}")
        bar.update(1)
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < total:
            save_checkpoint(out_dir / "checkpoints" / f"step-{step + 1:06d}", model, tokenizer, optimizer=optimizer,
                            scheduler=scheduler, step=step + 1, total_steps=total,
                            extra={"epoch_avg": (dict(epoch_avg.sums), epoch_avg.n), "world_size": world_size})
            prune_checkpoints(out_dir / "checkpoints", cfg.save_total_limit)
    bar.close()
    means = epoch_avg.means()
    # written before the model: a run killed in between redoes the tail of training and rewrites both
    on_main(atomic_write_json, out_dir / "train_summary.json", {f"train/{k}": v for k, v in means.items()})
    save_checkpoint(out_dir / "model", model, tokenizer, optimizer=optimizer, scheduler=scheduler, step=total,
                    total_steps=total, extra={"iteration": iteration, "method": method})
    prune_checkpoints(out_dir / "checkpoints", 0)
    return means
