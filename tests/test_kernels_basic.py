"""Smoke check of the public API; the exhaustive comparisons live in test_sequence_logps.py."""

import torch

from tspin_kernels import sequence_logps


def test_impls_agree_on_a_small_batch():
    h = torch.randn(3, 7, 16)
    w = torch.randn(50, 16)
    lab = torch.randint(0, 50, (3, 7))
    lab[:, :2] = -100
    ref = sequence_logps(h, w, lab, impl="reference")
    for impl in ("torch", "triton"):
        torch.testing.assert_close(sequence_logps(h, w, lab, impl=impl), ref, rtol=1e-5, atol=1e-4)
