"""Exact resume with randomness: a tiny Llama with attention dropout 0.1 trained with dropout kept on
(disable_dropout: false), SIGKILLed at chosen moments and resumed, ends bit-identical to an uninterrupted run, for
`tspin iterate` and `tspin train`, and so does `tspin train` with dropout off (`iterate` with dropout off:
tests/test_resume.py). Every micro-batch seeds the RNGs from (seed, step, micro-batch, rank), so a resumed run
draws the masks an uninterrupted one drew whatever ran before it in the process (generation, a checkpoint's RNG)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _kill_resume import assert_same_run, kill_at, launch, write_cfg
from _trainer_helpers import one_thread, task_file, tiny_cfg, tiny_policy  # noqa: F401 (one_thread: autouse)

from tspin.experiments.demo import build_model, build_tokenizer


def _model(path: Path, dropout: float) -> Path:
    tok = build_tokenizer()
    model = build_model(tok, hidden=32, layers=1, heads=2, seed=0)
    model.config.attention_dropout = dropout  # what the attention modules read when the model is loaded
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_the_dropout_model_draws_masks_while_training(tmp_path):
    """The setting the tests below run: with disable_dropout false the loaded policy's attention dropout is live
    (two forwards in train mode differ, and agree when the RNG is seeded alike)."""
    from tspin.batch import collate
    from tspin.data import build_features, load_records
    from tspin.losses import policy_logps

    model_dir = _model(tmp_path / "m", 0.1)
    policy = tiny_policy(model_dir, disable_dropout=False).train()
    tok = build_tokenizer()
    feats = build_features(load_records(task_file(tmp_path / "d.jsonl", 4)), tok, ("real",), template="paper",
                           max_length=40, max_prompt_length=24)
    batch = collate(feats, ("real",), tok.pad_token_id, "padded")

    def logps(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return policy_logps(policy, batch, impl="torch")

    assert not torch.equal(logps(0), logps(1)) and torch.equal(logps(2), logps(2))


# (command, attention dropout, [(moment to kill at, save_steps of that launch)]): one kill each, where resuming
# depends on the RNG: iterate in iteration 1 before any checkpoint (the case that drifted: nothing restored the RNG
# when an iteration's training started), train after a mid-run checkpoint (the RNG state comes from it)
CASES = {
    "iterate-dropout-on": ("iterate", 0.1, [("iteration 1 training", 0)]),
    "train-dropout-on": ("train", 0.1, [("train, after a mid-run checkpoint", 2)]),
    "train-dropout-off": ("train", 0.0, [("train, after a mid-run checkpoint", 2)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_and_resumed_runs_match_the_uninterrupted_one_bit_for_bit(tmp_path, case):
    command, dropout, chain = CASES[case]
    model_dir = _model(tmp_path / "m", dropout)
    task_file(tmp_path / "train.jsonl", 24)  # 6 optimizer steps per iteration
    task_file(tmp_path / "eval.jsonl", 4, seed=2)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    settings = dict(disable_dropout=dropout == 0.0, save_steps=0, generation_batch_size=4, eval_batch_size=4,
                    **({"method": "sft"} if command == "train" else {}))
    ref = launch(write_cfg(tmp_path, model_dir, ref_out, **settings), command=command)
    for i, (moment, save_steps) in enumerate(chain):
        proc = launch(write_cfg(tmp_path, model_dir, out, **{**settings, "save_steps": save_steps}),
                      *(["--resume"] if i else []), command=command)
        kill_at(proc, out, moment)
    resumed = launch(write_cfg(tmp_path, model_dir, out, **settings), "--resume", command=command)
    assert resumed.wait() == 0, resumed.stdout.read().decode()[-2000:]
    assert ref.wait() == 0, ref.stdout.read().decode()[-2000:]
    ra, rb = assert_same_run(ref_out, out, models=("iter0/model", "iter1/model") if command == "iterate"
                             else ("model",))
    assert len(rb) == (12 if command == "iterate" else 6)
