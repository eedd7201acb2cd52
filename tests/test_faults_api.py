"""Faults that enter through the Python API (the kernels, the TRL / HF trainer, tspin's run and state functions):
each bad input raises the named exception with a message that names the argument, and the inputs that gave a
silent result (alpha=1e39's infinite loss, NaN at ignored positions through the reference path, a meta-device
tensor's error from deep inside torch) now give a clear error or the right, finite answer."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from datasets import Dataset

from tests._oracle import make_inputs
from tests._trl_tiny import char_tokenizer, tiny_model, triplet_rows
from tspin_kernels import (
    SPINLoss,
    TSPINLoss,
    sequence_logps,
    spin_loss,
    spin_loss_from_logps,
    tspin_loss,
    tspin_loss_from_logps,
)
from tspin_kernels.integrations import LossSpec
from tspin_kernels.integrations.tspin_trainer import TSPINConfig, TSPINTrainer

META = torch.device("meta")
R, T, D, V = 6, 5, 8, 20


def _x(device=None):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(R, T, D, generator=g), torch.randn(V, D, generator=g)
    lab = torch.randint(0, V, (R, T), generator=g)
    if device is not None:
        h, w, lab = h.to(device), w.to(device), lab.to(device)
    return h, w, lab


def _logps(device=None):
    return [torch.randn(3, device=device) - 10 for _ in range(4)]


def _trainer_args(tmp_path, **kw):
    return TSPINConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                       **kw)


def _trainer_with_long_prompts(tmp_path, which: str):
    tok = char_tokenizer()
    data = Dataset.from_dict({k: v[:3] for k, v in triplet_rows(3).items()})
    args = _trainer_args(tmp_path, max_length=4)  # every prompt is longer: nothing left to train on
    kw = {"train_dataset": data} if which == "train" else {"train_dataset": None, "eval_dataset": data}
    return TSPINTrainer(tiny_model(tok), args=args, processing_class=tok, **kw)


def _run_both(tmp_path):
    from _trainer_helpers import tiny_cfg

    from tspin.selfplay import train

    return train(tiny_cfg(output_dir=str(tmp_path / "r")), resume=True, overwrite=True)


def _store(value):
    from tspin.state_file import write_state

    return lambda tmp_path: write_state(tmp_path / "s", {"ok": 1, "bad": value})


def _read_missing(tmp_path):
    from tspin.state_file import read_state

    return read_state(tmp_path / "nothing")


def _config(**overrides):
    from tspin.config import load_config

    return lambda tmp_path: load_config(overrides=overrides)


# (id, call(tmp_path), exception, message pattern)
CASES = [
    # a tensor without data
    ("sequence-logps-meta-torch", lambda p: sequence_logps(*_x(META), impl="torch"), ValueError,
     "hidden: is on the meta device"),
    ("sequence-logps-meta-triton", lambda p: sequence_logps(*_x(META), impl="triton"), ValueError,
     "hidden: is on the meta device"),
    ("sequence-logps-meta-reference", lambda p: sequence_logps(*_x(META), impl="reference"), ValueError,
     "hidden: is on the meta device"),
    ("sequence-logps-meta-auto", lambda p: sequence_logps(*_x(META)), ValueError, "hidden: is on the meta device"),
    ("tspin-loss-meta", lambda p: tspin_loss(*_x(META), impl="torch"), ValueError, "hidden: is on the meta device"),
    ("tspin-loss-meta-fused", lambda p: tspin_loss(*_x(META), fused=True, impl="torch"), ValueError,
     "hidden: is on the meta device"),
    ("spin-loss-meta", lambda p: spin_loss(*_x(META), torch.zeros(R, device=META), impl="torch"), ValueError,
     "hidden: is on the meta device"),
    ("tspin-from-logps-meta", lambda p: tspin_loss_from_logps(*_logps(META)[:3]), ValueError,
     "real: is on the meta device"),
    ("spin-from-logps-meta", lambda p: spin_loss_from_logps(*_logps(META)), ValueError, "real: is on the meta device"),
    ("module-meta", lambda p: TSPINLoss(impl="torch")(*_x(META)), ValueError, "hidden: is on the meta device"),
    # loss scales beyond the bound: the loss would overflow float32 (the probe: alpha=1e39 gave inf)
    ("tspin-alpha-1e39-torch", lambda p: tspin_loss(*_x(), alpha=1e39, impl="torch"), ValueError,
     r"alpha: expected a finite number with \|alpha\| <= 1e\+06"),
    ("tspin-alpha-1e39-triton", lambda p: tspin_loss(*_x(), alpha=1e39, impl="triton"), ValueError,
     r"alpha: expected a finite number with \|alpha\| <= 1e\+06"),
    ("tspin-alpha-negative-1e7", lambda p: tspin_loss(*_x(), alpha=-1e7, impl="torch"), ValueError,
     r"\|alpha\| <= 1e\+06 .*got -10000000.0"),
    ("tspin-beta-2e6", lambda p: tspin_loss(*_x(), beta=2e6, impl="torch"), ValueError, r"beta: .*\|beta\| <= 1e\+06"),
    ("tspin-alpha-int-huge", lambda p: tspin_loss(*_x(), alpha=10**40, impl="torch"), ValueError, "alpha: expected"),
    ("spin-beta-1e39", lambda p: spin_loss(*_x(), torch.zeros(R), beta=1e39, impl="torch"), ValueError,
     r"beta: .*<= 1e\+06"),
    ("tspin-from-logps-alpha-1e7", lambda p: tspin_loss_from_logps(*_logps()[:3], alpha=1e7), ValueError,
     r"alpha: .*<= 1e\+06"),
    ("spin-from-logps-beta-neg", lambda p: spin_loss_from_logps(*_logps(), beta=-1e7), ValueError,
     r"beta: .*<= 1e\+06"),
    ("module-tspin-alpha", lambda p: TSPINLoss(alpha=1e39), ValueError, r"alpha: .*<= 1e\+06"),
    ("module-spin-beta", lambda p: SPINLoss(beta=1e7), ValueError, r"beta: .*<= 1e\+06"),
    ("loss-spec-alpha", lambda p: LossSpec("tspin", alpha=1e7), ValueError, r"alpha: .*<= 1e\+06"),
    ("loss-spec-spin-beta", lambda p: LossSpec("spin", beta=1e39, ref_logps=torch.zeros(4)), ValueError,
     r"beta: .*<= 1e\+06"),
    # the TRL / HF trainer
    ("trainer-config-alpha-inf", lambda p: _trainer_args(p, alpha=math.inf), ValueError, "alpha: expected a finite"),
    ("trainer-config-alpha-1e7", lambda p: _trainer_args(p, alpha=1e7), ValueError, r"alpha: .*<= 1e\+06"),
    ("trainer-config-beta-nan", lambda p: _trainer_args(p, beta=math.nan), ValueError, "beta: expected a finite"),
    ("trainer-config-beta-negative", lambda p: _trainer_args(p, beta=-0.5), ValueError,
     "beta: expected a finite number >= 0"),
    ("trainer-prompts-all-too-long", lambda p: _trainer_with_long_prompts(p, "train"), ValueError,
     r"train_dataset: every one of its 3 prompts has at least max_length=4 tokens"),
    ("trainer-eval-prompts-all-too-long", lambda p: _trainer_with_long_prompts(p, "eval"), ValueError,
     r"eval_dataset: every one of its 3 prompts has at least max_length=4 tokens"),
    # tspin's config, runs and state files
    ("config-alpha-above-bound", _config(alpha="1e7"), ValueError, r"config: alpha=10000000.0: must be <= 1e\+06"),
    ("config-spin-lambda-above-bound", _config(spin_lambda="2e6"), ValueError, r"spin_lambda=2000000.0: must be <="),
    ("config-output-dir-empty", _config(output_dir=""), ValueError, "output_dir='': must name a directory"),
    ("config-output-dir-blank", _config(output_dir="  "), ValueError, "output_dir='  ': must name a directory"),
    ("train-resume-and-overwrite", _run_both, ValueError, "--resume and --overwrite: choose one"),
    ("state-holds-a-function", _store(print), TypeError, r"s\['bad'\]: a builtin_function_or_method cannot be stored"),
    ("state-holds-a-set", _store({1, 2}), TypeError, r"s\['bad'\]: a set cannot be stored"),
    ("state-file-missing", _read_missing, ValueError, "nothing/state.json: no such file"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_api_input_names_the_argument(case, tmp_path):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call(tmp_path)


def test_api_matrix_size():
    assert len(CASES) >= 30


# ------------------------------------------------------------------------------------------------ silent results
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shift", [False, True], ids=["aligned", "shift"])
def test_ignored_positions_may_hold_nan(impl, dtype, shift):
    """Every path ignores ignored positions whatever they hold (the probe: impl='reference' returned NaN for NaN
    in padding): log-probs and gradients equal those of the same input with zeros there, and are finite."""
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("float64 is for the torch paths")
    inp = make_inputs(4, 9, 16, 37, dtype, ignore_frac=0.4, seed=3)
    h, w, lab = inp["hidden"], inp["weight"], inp["labels"].clone()
    lab[:, -2:] = -100  # right padding
    rows = lab[:, 1:] if shift else lab
    ignored = torch.cat([rows == -100, torch.ones_like(lab[:, :1], dtype=torch.bool)], 1) if shift else rows == -100
    dirty = h.detach().clone()
    dirty[ignored] = float("nan")
    clean = h.detach().clone()
    clean[ignored] = 0.0
    outs = []
    for hh in (clean, dirty):
        hh, ww = hh.clone().requires_grad_(), w.detach().clone().requires_grad_()
        out = sequence_logps(hh, ww, lab, shift=shift, impl=impl)
        (out * torch.linspace(-1, 1, out.numel())).sum().backward()
        outs.append((out.detach(), hh.grad, ww.grad))
    for a, b in zip(*outs):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_the_largest_allowed_alpha_gives_a_finite_loss():
    """At the bound, with margins of hundreds of nats, the T-SPIN loss and its gradients stay finite."""
    real, gen, proto = (torch.tensor([-500.0, -20.0]), torch.tensor([-5.0, -900.0]), torch.tensor([-800.0, -1.0]))
    gen.requires_grad_()
    loss = tspin_loss_from_logps(real, gen, proto, alpha=1e6, beta=1e6)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(gen.grad).all()


def test_a_trainer_state_survives_the_round_trip_exactly(tmp_path):
    """RNG states (Python tuples, a numpy array, uint8 tensors), an AdamW state dict keyed by parameter id (int
    keys, tuples of betas, 0-d step tensors), NaN and inf come back equal, with their types."""
    from tspin.rng import rng_state
    from tspin.state_file import read_state, write_state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    random.random(), np.random.rand(), torch.rand(1)
    tree = {"rng": rng_state(), "optimizer": opt.state_dict(), "loss": math.nan, "norm": -math.inf,
            "epoch_avg": ({"loss": 1.5}, 3), "ids": ["a", "b"], "none": None, "flag": True}
    write_state(tmp_path / "s", tree)
    back = read_state(tmp_path / "s")
    assert back["rng"]["python"] == tree["rng"]["python"] and isinstance(back["rng"]["python"], tuple)
    assert back["rng"]["numpy"][0] == "MT19937" and np.array_equal(back["rng"]["numpy"][1], tree["rng"]["numpy"][1])
    assert back["rng"]["numpy"][1].dtype == tree["rng"]["numpy"][1].dtype
    assert torch.equal(back["rng"]["torch"], tree["rng"]["torch"])
    assert back["optimizer"]["param_groups"] == tree["optimizer"]["param_groups"]
    assert isinstance(back["optimizer"]["param_groups"][0]["betas"], tuple)
    for k, state in tree["optimizer"]["state"].items():
        assert set(back["optimizer"]["state"][k]) == set(state)
        for name, value in state.items():
            assert torch.equal(back["optimizer"]["state"][k][name], value)
    assert math.isnan(back["loss"]) and back["norm"] == -math.inf and back["epoch_avg"] == ({"loss": 1.5}, 3)
    assert back["ids"] == ["a", "b"] and back["none"] is None and back["flag"] is True
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])  # torch takes it as it took the original


def test_loading_a_legacy_checkpoint_through_the_api_runs_nothing(tmp_path):
    """tspin.checkpoint.load_checkpoint on a directory with a pickled trainer_state.pt (the format tspin 0.1.0
    wrote, or a planted file): a clear ValueError, and the pickle is never opened."""
    from _trainer_helpers import plant_pickle, tiny_model_dir, tiny_policy

    from tspin.checkpoint import load_checkpoint, save_checkpoint

    policy = tiny_policy(tiny_model_dir(tmp_path / "m"))
    save_checkpoint(tmp_path / "ckpt", policy)  # weights only
    plant_pickle(tmp_path / "ckpt" / "trainer_state.pt", tmp_path / "marker")
    with pytest.raises(ValueError, match="trainer_state.pt: a trainer state in the pickle format of tspin 0.1.0"):
        load_checkpoint(tmp_path / "ckpt", policy)
    assert not (tmp_path / "marker").exists()


def test_probe_kinds_are_all_covered():
    """The API cases span every kind the probe found: meta tensors, loss scales, the trainer, config, state."""
    kinds = {c[0].split("-")[0] for c in CASES}
    assert {"sequence", "tspin", "spin", "module", "loss", "trainer", "config", "state", "train"} <= kinds
