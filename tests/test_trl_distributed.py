"""FusedDPOTrainer under DDP (torchrun, 2 gloo processes on CPU) against trl.DPOTrainer under the same launch: the
same gathered metrics every step and the same final weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install 'tspin[trl]')")

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]


def test_ddp_training_equals_trl(tmp_path):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests._trl_dist_worker", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    res = torch.load(tmp_path / "results.pt", weights_only=False)
    ours, theirs = res["fused"], res["trl"]
    assert ours["world"] == theirs["world"] == 2
    assert ours["head_calls"] > 0 and theirs["head_calls"] == 0  # the fused run went through our forward
    steps_a = [e for e in ours["logs"] if "loss" in e]
    steps_b = [e for e in theirs["logs"] if "loss" in e]
    assert len(steps_a) == len(steps_b) == 2
    for a, b in zip(steps_a, steps_b):
        assert set(a) == set(b)
        for key, value in b.items():
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert steps_b[0]["num_tokens"] > 0 and steps_b[0]["rewards/margins"] != 0
    for name, w in theirs["weights"].items():
        torch.testing.assert_close(ours["weights"][name], w, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
