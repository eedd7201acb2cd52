"""The training loop: one pass of T-SPIN / SPIN / SFT over a tokenized dataset (one self-play iteration).

Read top to bottom: optimizer + schedule, resume from the newest checkpoint, then for every optimizer step the
micro-batches of its accumulation window, clipping, the step, metrics and periodic checkpoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tspin_kernels.integrations import attention_implementation, backbone_and_head

from .batch import collate, count_tokens
from .checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .io import atomic_write_json
from .losses import autocast, compute_loss
from .methods import LOSS_FIELDS, loss_of
from .metrics import Averager, MetricsWriter, read_back
from .phases import NULL_CLOCK, PhaseClock
from .ranks import all_sum, on_main, world
from .rng import seed_all
from .wrapping import clip_grad_norm, grad_sync, policy_of, reshard

MAX_STEPS = 10_000_000


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm of an optimizer step is not finite: the run stops before that update."""


@dataclass(frozen=True)
class TrainSettings:
    """What one pass of the loop reads of a run's configuration (the keys of the same names; tspin.settings builds
    it from a Config). ``fused_loss``: tspin_kernels' ``fused=`` (None: its choice). ``beta`` weights T-SPIN's
    history term after iteration 0, ``beta_iter0`` (None: beta) at it, and ``no_history`` drops the term."""

    # the data over the steps
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    num_train_epochs: float
    seed: int
    # the optimizer and its schedule
    optimizer: str
    learning_rate: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    rmsprop_alpha: float
    lr_scheduler: str
    warmup_ratio: float
    max_grad_norm: float | None
    # the loss
    alpha: float
    beta: float
    beta_iter0: float | None
    no_history: bool
    spin_lambda: float
    average_logps: bool
    loss_impl: str
    fused_loss: bool | None
    layout: str
    bf16: bool
    # what is written and shown
    save_steps: int
    save_total_limit: int
    logging_steps: int
    progress: bool

    def beta_at(self, iteration: int) -> float:
        if self.no_history:
            return 0.0
        if iteration == 0 and self.beta_iter0 is not None:
            return self.beta_iter0
        return self.beta


def build_optimizer(model, settings: TrainSettings) -> torch.optim.Optimizer:
    s = settings
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.learning_rate, betas=(s.adam_beta1, s.adam_beta2),
                                 weight_decay=s.weight_decay)
    return torch.optim.RMSprop(params, lr=s.learning_rate, alpha=s.rmsprop_alpha, weight_decay=s.weight_decay)


def build_scheduler(optimizer, settings: TrainSettings, total_steps: int):
    """transformers' warmup schedules: warmup, then linear decay to 0, cosine decay to 0, or constant.

    The warmup lasts w = int(warmup_ratio * total_steps) steps and starts one step in: the first optimizer step
    runs at peak/(w+1), not at 0 (a step at lr 0 would only move Adam's moments), and step w reaches the peak. In
    transformers' own terms this is a schedule of w+1 warmup and total_steps+1 steps, started at step 1.
    """
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = int(settings.warmup_ratio * total_steps) + 1
    for group in optimizer.param_groups:  # torch's schedulers start past step 0 only from a recorded initial lr
        group.setdefault("initial_lr", group["lr"])
    if settings.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup, last_epoch=0)
    make = get_cosine_schedule_with_warmup if settings.lr_scheduler == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, warmup, total_steps + 1, last_epoch=0)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_windows(n: int, settings: TrainSettings, seed: int, world_size: int = 1) -> list[list[list[int]]]:
    """For every optimizer step, its micro-batches of example indices, over all ranks (a micro-batch holds
    per_device_train_batch_size examples per rank). Fixed by (seed, epoch), so the data position of a resumed run
    is simply the step number, and W ranks with batch size b take the steps of one process with batch size W*b."""
    mb = settings.per_device_train_batch_size * world_size
    per_step = mb * settings.gradient_accumulation_steps
    steps_per_epoch = math.ceil(n / per_step)
    total = max(1, math.ceil(steps_per_epoch * settings.num_train_epochs))
    if total > MAX_STEPS:  # the windows are listed up front: a typo like 1e9 epochs would never start
        raise ValueError(f"config: num_train_epochs={settings.num_train_epochs!r}: {total} optimizer steps per "
                         f"iteration ({n} examples, {per_step} per step); at most {MAX_STEPS} are allowed")
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


def train_loop(model, tokenizer, features: list[dict], settings: TrainSettings, *, method: str, out_dir: str | Path,
               metrics: MetricsWriter, iteration: int = 0, beta: float | None = None, seed: int | None = None,
               desc: str = "train", clock: PhaseClock = NULL_CLOCK) -> dict:
    """Train `model` in place on `features`; checkpoints go to out_dir/checkpoints, the final one to out_dir/model.

    `model` is the training policy (tspin.models.load_policy, or tspin.wrapping.wrap_model); under torchrun every
    rank calls this with the same features and trains on its share of each step.

    Resumes from the newest complete checkpoint under out_dir, reaching the same weights as an uninterrupted run:
    every micro-batch seeds the RNGs from (seed, step, micro-batch, rank), so dropout draws the same masks too.
    Metrics stay on the device and are read back once per logged step. Returns the means of the last epoch's
    metrics (also written to out_dir/train_summary.json). ``method``: the config's (tspin, spin, sft); ``beta``
    (default: the settings' for ``iteration``) and ``seed`` (default: the settings' seed + 1000 * iteration) as the
    caller decides them. ``clock``: times the checkpoint writes as their own phase (tspin.phases).
    """
    s = settings
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    rank, world_size = world()
    loss_name = loss_of(method, s.no_history)  # the loss this run trains with, decided once
    fields = LOSS_FIELDS[loss_name]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab_size = backbone_and_head(policy_of(model).model)[1].out_features
    attn = attention_implementation(policy_of(model).model)  # how collate lays out shared-prefix rows
    beta = s.beta_at(iteration) if beta is None else beta
    run_seed = s.seed + 1000 * iteration if seed is None else seed
    windows = step_windows(len(features), s, run_seed, world_size)
    total = len(windows)
    optimizer = build_optimizer(reshard(model), s)  # FSDP2: the sharded parameters, not a generate()'s gathers
    scheduler = build_scheduler(optimizer, s, total)

    start, epoch_avg = 0, Averager()
    ckpt = latest_checkpoint(out_dir / "checkpoints")
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer=optimizer, scheduler=scheduler)
        if state.get("world_size", 1) != world_size:  # the steps' data split depends on the number of ranks
            raise ValueError(f"--resume: {ckpt} was written by {state.get('world_size', 1)} process(es), this run has "
                             f"{world_size}; resume a mid-iteration checkpoint with the same --nproc_per_node")
        start = state["step"]
        epoch_avg = Averager.from_state(state.get("epoch_avg", ({}, 0)), device)
    # lines a killed run logged after the position it resumes from (its checkpoint, or the start when it had none)
    # are written again below
    metrics.rewind(lambda r: not (r.get("phase") == "train" and r.get("iteration") == iteration
                                  and r.get("method") == method and r.get("step", 0) > start))

    model.train()
    steps_per_epoch = math.ceil(len(features) / (s.per_device_train_batch_size * world_size
                                                 * s.gradient_accumulation_steps))
    bar = tqdm(total=total, initial=start, desc=desc, disable=not s.progress or rank != 0, dynamic_ncols=True)
    busy_s, tokens = 0.0, 0  # since the last logged line
    for step in range(start, total):
        t0 = time.perf_counter()
        # the whole step's counts over all ranks, from the features every rank holds: no communication
        examples = [i for mb in windows[step] for i in mb]
        counted, n_tokens = count_tokens([features[i] for i in examples], fields)
        # exact accumulation: every micro-batch loss is a sum, divided by the whole window's count over all ranks;
        # DDP / FSDP2 average gradients over ranks, hence the factor world_size
        denom = (counted if method == "sft" else len(examples)) / world_size
        shares = [rank_share(mb, rank, world_size) for mb in windows[step]]
        avg, window_loss = Averager(), 0.0
        for j, (mine, w) in enumerate(shares):
            # what the micro-batch draws (dropout) is a function of its position alone: a resumed run draws the same
            seed_all(run_seed, step, j, rank)
            batch = collate([features[i] for i in mine], fields, pad, s.layout, vocab_size=vocab_size,
                            attn_implementation=attn).to(device)
            with grad_sync(model, enabled=j == len(shares) - 1):  # communicate once per step
                with autocast(device, s.bf16):
                    loss, m = compute_loss(model, batch, method=loss_name, alpha=s.alpha, beta=beta,
                                           spin_lambda=s.spin_lambda, impl=s.loss_impl, average=s.average_logps,
                                           fused=s.fused_loss)
                (loss / denom if w else loss * 0.0).backward()
            window_loss = window_loss + loss.detach().double() * w / denom / world_size
            avg.add(m, int(w) * batch.num_examples)
        if world_size > 1:  # the logged numbers are those of the whole step
            window_loss = all_sum(window_loss)
            avg.add_ranks()
            avg.n = len(examples)
        grad_norm = clip_grad_norm(model, s.max_grad_norm)  # global norm over ranks / shards
        means = {"loss": window_loss, **avg.mean_tensors()}
        # The guard against a diverged step reads one flag per optimizer step, before optimizer.step(): the loss
        # and the gradient norm are already reduced over the ranks, so every rank reads the same flag and stops at
        # the same step, and a non-finite update never reaches the weights or the optimizer state. At a logged step
        # the metrics ride on that same read. (A device-side skip would save this sync, but the optimizer would have
        # to take a found-inf input, as only torch's fused Adam/AdamW/SGD do, not RMSprop, this project's default;
        # one sync per optimizer step, after a whole accumulation window, costs little next to the step itself.)
        finite = torch.isfinite(window_loss) & torch.isfinite(grad_norm)
        logged = (step + 1) % s.logging_steps == 0 or step + 1 == total
        if logged:
            values = read_back({"finite": finite, "grad_norm": grad_norm, **means})  # the step's one host sync
            ok = values.pop("finite") == 1.0
        else:
            ok = bool(finite)  # the step's one host sync
        if not ok:
            _stop_non_finite(model, tokenizer, out_dir, step, total, desc, window_loss, grad_norm,
                             [features[i]["prompt_id"] for i in examples])
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step // steps_per_epoch == (total - 1) // steps_per_epoch:
            epoch_avg.add(means, avg.n)
        tokens += n_tokens
        # the sync above waited for this step's forward and backward; its optimizer step counts with the next step
        busy_s += time.perf_counter() - t0
        if logged:
            tokens_per_s = tokens / busy_s
            metrics.write(phase="train", method=method, iteration=iteration, step=step + 1, total_steps=total,
                          epoch=round((step + 1) / steps_per_epoch, 4), lr=lr, grad_norm=values.pop("grad_norm"),
                          beta=beta, tokens_per_s=tokens_per_s, **values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
            busy_s, tokens = 0.0, 0
        bar.update(1)
        if s.save_steps and (step + 1) % s.save_steps == 0 and step + 1 < total:
            with clock.phase("checkpoint", iteration=iteration):
                save_checkpoint(out_dir / "checkpoints" / f"step-{step + 1:06d}", model, tokenizer=tokenizer,
                                optimizer=optimizer, scheduler=scheduler,
                                state={"step": step + 1, "total_steps": total, "epoch_avg": epoch_avg.state(),
                                       "world_size": world_size})
            prune_checkpoints(out_dir / "checkpoints", s.save_total_limit)
    bar.close()
    means = epoch_avg.means()
    # written before the model: a run killed in between redoes the tail of training and rewrites both
    on_main(atomic_write_json, out_dir / "train_summary.json", {f"train/{k}": v for k, v in means.items()})
    # the finished policy: no optimizer or scheduler state (nothing resumes from it mid-schedule; every iteration
    # starts a fresh optimizer), which keeps a model directory at the size of its weights rather than three times it
    with clock.phase("checkpoint", iteration=iteration):
        save_checkpoint(out_dir / "model", model, tokenizer=tokenizer,
                        state={"step": total, "total_steps": total, "iteration": iteration, "method": method})
    prune_checkpoints(out_dir / "checkpoints", 0)
    return means


def _stop_non_finite(model, tokenizer, out_dir: Path, step: int, total: int, desc: str, loss: torch.Tensor,
                     grad_norm: torch.Tensor, prompt_ids: list[str]) -> None:
    """Save the weights the failed step started from (to inspect; not a resumable checkpoint) and raise on every
    rank. Nothing of this step was applied: its gradients are dropped."""
    model.zero_grad(set_to_none=True)
    path = out_dir / f"nonfinite-step-{step + 1:06d}"
    loss_v, norm_v = read_back({"loss": loss, "grad_norm": grad_norm}).values()
    save_checkpoint(path, model, tokenizer=tokenizer, state={"step": step, "failed_step": step + 1, "loss": loss_v,
                                                             "grad_norm": norm_v, "prompt_ids": prompt_ids})
    # this rank's shard under FSDP2 (the message only: no collective)
    weights_ok = all(bool(torch.isfinite(getattr(p, "to_local", p.detach)()).all()) for p in model.parameters())
    what = " and ".join(f"non-finite {name} ({v})" for name, v in (("loss", loss_v), ("gradient norm", norm_v))
                        if not math.isfinite(v)) or f"non-finite values (loss {loss_v}, gradient norm {norm_v})"
    shown = ", ".join(prompt_ids[:4]) + (f" and {len(prompt_ids) - 4} more" if len(prompt_ids) > 4 else "")
    raise NonFiniteError(
        f"{desc}: step {step + 1}/{total}: {what}; the update was not applied and the run stopped. The weights "
        f"before this step are in {path} to inspect"
        + ("" if weights_ok else " (they hold non-finite values already: the previous update overflowed)")
        + f"; the step's prompt_ids: {shown}. Lower learning_rate, set max_grad_norm or check those rows, and start "
        "a new output_dir.")
