"""The opt-in backward filter (TSPIN_GRAD_FILTER) skips negligible vocab tiles and stays accurate."""

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


def _grads(h, w, lab):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    sequence_logps(h, w, lab, impl="triton").sum().backward()
    return h.grad, w.grad


def test_filter_is_accurate_and_really_skips(monkeypatch):
    h, w, lab = _peaked()
    exact = _grads(h, w, lab)
    monkeypatch.setenv("TSPIN_GRAD_FILTER", "1e-3")
    filtered = _grads(h, w, lab)
    for a, b in zip(filtered, exact):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2)
    # the skipped tiles' weight rows get exactly zero gradient, which the exact path does not give
    skipped_rows = filtered[1][32:].abs().sum(1) == 0
    assert skipped_rows.any() and not (exact[1][32:].abs().sum(1) == 0).any()


def test_filter_off_by_default_and_validated(monkeypatch):
    h, w, lab = _peaked()
    monkeypatch.setenv("TSPIN_GRAD_FILTER", "0")
    exact = _grads(h, w, lab)
    monkeypatch.delenv("TSPIN_GRAD_FILTER")
    torch.testing.assert_close(_grads(h, w, lab), exact, rtol=0, atol=0)
    monkeypatch.setenv("TSPIN_GRAD_FILTER", "lots")
    with pytest.raises(ValueError, match="TSPIN_GRAD_FILTER must be a float"):
        _grads(h, w, lab)
