"""DDP and FSDP2 with 2 gloo processes under torchrun vs the same T-SPIN step in one process.

One torchrun launch (tests/_dist_worker.py) runs every scenario; each test checks one of them against the
single-process computation done here with the same model, batch and optimizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from tests import _dist_worker as worker
from tests._hf_tiny import packed, tiny_llama, triplet_batch, triplet_rows, tspin_step_loss
from tspin.checkpoint import load_optimizer_state_dict
from tspin.generation import sharded_generate
from tspin.models import apply_lora, enable_gradient_checkpointing
from tspin.wrapping import wrap_model

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    tiny_llama(7).save_pretrained(tmp / "ref_ckpt")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TSPIN_IMPL": "torch", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests._dist_worker", str(tmp), str(tmp / "ref_ckpt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return tmp, torch.load(tmp / "results.pt", weights_only=False)


def _single_process(*, lora=False, checkpointing=False, tied=False):
    model = tiny_llama(0, tie_word_embeddings=tied)
    if lora:
        model = apply_lora(model, r=4, alpha=8)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    if checkpointing:
        enable_gradient_checkpointing(model)
    policy = wrap_model(model, "none")
    policy.train()
    rows = triplet_batch(worker.NUM_TRIPLETS)
    opt = _sgd(policy)
    loss, logps = tspin_step_loss(policy, rows)  # the whole batch, padded, in one go
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    opt.step()
    params = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    return {"loss": loss.item(), "logps": logps.detach(), "grads": grads, "params": params}


def _sgd(policy):
    return torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=worker.LR, momentum=worker.MOMENTUM)


def _per_rank_rows(logps: torch.Tensor, world: int) -> torch.Tensor:
    """Single-process logps [real; gen; proto] over all triplets -> (world, rows of a rank) as the ranks hold them."""
    real, gen, proto = logps.chunk(3)
    return torch.stack([torch.cat([x.chunk(world)[r] for x in (real, gen, proto)]) for r in range(world)])


def _assert_step_matches(dist, ref, world):
    torch.testing.assert_close(dist["logps"], _per_rank_rows(ref["logps"], world), rtol=1e-5, atol=1e-5)
    assert dist["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    assert set(dist["grads"]) == set(ref["grads"]) and ref["grads"]
    for name, g in ref["grads"].items():
        assert g.abs().max() > 0, name  # every trainable tensor is exercised
        torch.testing.assert_close(dist["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    total = torch.cat([g.reshape(-1) for g in ref["grads"].values()]).norm()
    assert dist["grad_norm"] == pytest.approx(float(total), rel=1e-5)
    assert set(dist["params"]) == set(ref["params"])
    for name, p in ref["params"].items():
        torch.testing.assert_close(dist["params"][name], p, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_ddp_step_matches_single_process(dist_results):
    _, res = dist_results
    _assert_step_matches(res["ddp"], _single_process(), res["world_size"])


def test_fsdp2_step_matches_single_process(dist_results):
    _, res = dist_results
    ref = _single_process()
    _assert_step_matches(res["fsdp2"], ref, res["world_size"])
    assert "lm_head.weight" in res["fsdp2"]["grads"]  # the sharded head got its gradient through the fused kernel


def test_fsdp2_lora_checkpointing_packed_matches_single_process_padded(dist_results):
    _, res = dist_results
    ref = _single_process(lora=True, checkpointing=True)
    _assert_step_matches(res["fsdp2_lora_gc_packed"], ref, res["world_size"])
    assert all("lora_" in n for n in ref["grads"])  # base weights, head included, stay frozen


def test_fsdp2_tied_head_matches_single_process(dist_results):
    """A head tied to the input embeddings stays in the root unit; the fused loss still sees the full weight."""
    _, res = dist_results
    ref = _single_process(tied=True)
    _assert_step_matches(res["fsdp2_tied"], ref, res["world_size"])
    torch.testing.assert_close(res["fsdp2_tied"]["params"]["lm_head.weight"],
                               res["fsdp2_tied"]["params"]["model.embed_tokens.weight"])


def test_checkpoint_saved_by_two_ranks_loads_in_one_process(dist_results):
    tmp, res = dist_results
    loaded = LlamaForCausalLM.from_pretrained(tmp / "ckpt_fsdp2")
    sd = loaded.state_dict()
    for name, p in res["fsdp2"]["params"].items():
        torch.testing.assert_close(sd[name], p, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_checkpoint_with_optimizer_resumes_exactly(dist_results, strategy):
    """save_checkpoint + load_checkpoint into a fresh policy and optimizer on the same ranks: bit-identical weights
    and optimizer state (what a resumed run continues from), and the saved trainer state."""
    _, res = dist_results
    before, after = res[strategy], res[f"{strategy}_resumed"]
    assert after["state"] == {"step": 1}
    assert set(after["params"]) == set(before["params"])
    for name, p in before["params"].items():
        torch.testing.assert_close(after["params"][name], p, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert set(after["optim"]["state"]) == set(before["optim"]["state"]) and before["optim"]["state"]
    for name, st in before["optim"]["state"].items():
        torch.testing.assert_close(after["optim"]["state"][name]["momentum_buffer"], st["momentum_buffer"], rtol=0,
                                   atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_optimizer_state_saved_by_two_ranks_loads_in_one_process(dist_results):
    _, res = dist_results
    ref = _single_process()
    policy = wrap_model(tiny_llama(0), "none")
    opt = _sgd(policy)
    load_optimizer_state_dict(policy, opt, res["fsdp2"]["optim"])
    names = {p: n for n, p in policy.model.named_parameters()}
    assert len(opt.state) == len(names)
    for p, st in opt.state.items():  # after one SGD step the momentum buffer is the (global) gradient
        torch.testing.assert_close(st["momentum_buffer"], ref["grads"][names[p]], rtol=1e-4, atol=1e-6)


def test_checkpoint_saved_by_one_process_loads_into_two_ranks(dist_results):
    tmp, res = dist_results
    ref = tiny_llama(7).state_dict()
    assert set(res["loaded"]) == set(ref)
    for name, p in ref.items():
        torch.testing.assert_close(res["loaded"][name], p, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_rank0_reads_checkpoint_other_ranks_start_on_meta(dist_results, strategy):
    """Weights and non-persistent buffers (rotary inv_freq) reach every rank: same log-probs as one process."""
    _, res = dist_results
    ref_model = tiny_llama(7)
    for name, p in ref_model.state_dict().items():
        torch.testing.assert_close(res[f"rank0_load_{strategy}_params"][name], p, rtol=0, atol=0)
    probe = triplet_rows(triplet_batch(worker.NUM_TRIPLETS), list(range(worker.NUM_TRIPLETS)))
    with torch.no_grad():
        expected = wrap_model(ref_model, "none")(**probe)
    for rank_logps in res[f"rank0_load_{strategy}_logps"]:  # every rank ran the full probe batch
        torch.testing.assert_close(rank_logps, expected, rtol=1e-5, atol=1e-5)


def test_sharded_generation_is_gathered_in_order(dist_results):
    _, res = dist_results
    assert res["rank_tags"] == [(i, i % 2) for i in range(7)]  # every item generated once, on rank i % world
    model = tiny_llama(0)
    # The generations come from the policy after the FSDP2 step: replay that step here.
    model.load_state_dict(res["fsdp2"]["params"])
    model.eval()
    expected = []
    with torch.no_grad():
        for p in res["prompts"]:
            ids = torch.tensor([p])
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4 + len(p),
                               do_sample=False, pad_token_id=0)
            expected.append(g[0, ids.shape[1]:].tolist())
    assert res["generated"] == expected


def test_sharded_generate_single_process_and_bad_input():
    assert sharded_generate([3, 1, 2], lambda xs: [x * 10 for x in xs]) == [30, 10, 20]
    assert sharded_generate([], lambda xs: xs) == []
    with pytest.raises(ValueError, match="generate_fn"):
        sharded_generate([1, 2], lambda xs: xs[:1])
    with pytest.raises(TypeError, match="generate_fn"):
        sharded_generate([1], None)


def test_wrap_model_bad_input():
    with pytest.raises(ValueError, match="strategy"):
        wrap_model(tiny_llama(0), "zero3")
    with pytest.raises(ValueError, match="strategy.*process group"):
        wrap_model(tiny_llama(0), "fsdp2")


def test_packed_layout_used_by_worker_is_exact():
    """The worker packs its rows; packing alone must not change the step (checked without processes)."""
    rows = triplet_batch(2)
    policy = wrap_model(tiny_llama(0), "none")
    a, _ = tspin_step_loss(policy, rows)
    b, _ = tspin_step_loss(policy, packed(rows))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
