"""The opt-in backward filter (``grad_filter_eps=``) skips negligible vocab tiles and stays accurate."""

import pytest
import torch

from tspin_kernels import sequence_logps


def _peaked(R=2, T=8, D=16, V=320):
    """Logits dominated by a few vocab entries, as in a trained LM: most tiles are negligible."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, D, generator=g) * 0.05
    w[:24] = torch.randn(24, D, generator=g) * 3  # the "frequent" tokens live in the first tile
    h = torch.randn(R, T, D, generator=g)
    lab = torch.randint(0, 24, (R, T), generator=g)
    lab[:, :3] = -100
    return h, w, lab


def _grads(h, w, lab, **options):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    sequence_logps(h, w, lab, impl="triton", **options).sum().backward()
    return h.grad, w.grad


def test_filter_is_accurate_and_really_skips():
    h, w, lab = _peaked()
    exact = _grads(h, w, lab)
    filtered = _grads(h, w, lab, grad_filter_eps=1e-3)
    for a, b in zip(filtered, exact):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2)
    # the skipped tiles' weight rows get exactly zero gradient, which the exact path does not give
    skipped_rows = filtered[1][32:].abs().sum(1) == 0
    assert skipped_rows.any() and not (exact[1][32:].abs().sum(1) == 0).any()


def test_filter_off_by_default_and_validated():
    h, w, lab = _peaked()
    exact = _grads(h, w, lab, grad_filter_eps=0.0)
    torch.testing.assert_close(_grads(h, w, lab), exact, rtol=0, atol=0)
    for bad in (1.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match=r"grad_filter_eps: expected a float in \[0, 1\)"):
            _grads(h, w, lab, grad_filter_eps=bad)
    with pytest.raises(TypeError, match="grad_filter_eps: expected a float"):
        _grads(h, w, lab, grad_filter_eps="1e-3")
