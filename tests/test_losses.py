"""tspin_loss / spin_loss against the method's formula (docs/contract.md#the-method), including its gradient, and
the nn.Module wrappers."""

import pytest
import torch
import torch.nn.functional as F

from tests._oracle import make_inputs
from tspin_kernels import (
    SequenceLogps,
    SPINLoss,
    TSPINLoss,
    TSPINNoHistoryLoss,
    sequence_logps,
    spin_loss,
    tspin_loss,
    tspin_no_history_loss,
)
from tspin_kernels.functional import spin_loss_from_logps, tspin_loss_from_logps, tspin_no_history_loss_from_logps


def _l(t):
    return -F.logsigmoid(t)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.1), (0.5, 1.0), (2.0, 0.0)])
def test_tspin_formula_and_gradient(alpha, beta):
    real, gen, proto = (torch.randn(5, dtype=torch.float64, requires_grad=True) * 3 for _ in range(3))
    real, gen, proto = (x.detach().requires_grad_() for x in (real, gen, proto))
    loss = tspin_loss_from_logps(real, gen, proto, alpha=alpha, beta=beta)
    cur, his = real - gen, gen - proto
    expected = (_l(alpha * cur) + beta * _l(alpha * his)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    s, B = torch.sigmoid, 5
    torch.testing.assert_close(real.grad, -alpha * s(-alpha * cur).detach() / B)
    torch.testing.assert_close(proto.grad, alpha * beta * s(-alpha * his).detach() / B)
    torch.testing.assert_close(gen.grad, (alpha * s(-alpha * cur) - alpha * beta * s(-alpha * his)).detach() / B)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_tspin_no_history_formula_and_gradient(alpha):
    real, gen = (torch.randn(5, dtype=torch.float64).mul(3).requires_grad_() for _ in range(2))
    loss = tspin_no_history_loss_from_logps(real, gen, alpha=alpha)
    torch.testing.assert_close(loss, _l(alpha * (real - gen)).mean())
    loss.backward()
    s = -alpha * torch.sigmoid(-alpha * (real - gen)).detach() / 5
    torch.testing.assert_close(real.grad, s)
    torch.testing.assert_close(gen.grad, -s)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_tspin_no_history_is_spin_with_zero_references_bit_for_bit(impl, fused):
    """The loss the trainer used to route T-SPIN without history through (SPIN, beta=alpha, zero references) and
    the named loss give the same bits: loss, log-probs and every gradient."""
    inp = make_inputs(4, 9, 16, 50, torch.float32, bias=True)
    runs = []
    for name in ("no_history", "spin_zero_refs"):
        h, w, b = (inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
        kw = dict(bias=b, impl=impl, fused=fused, shift=True)
        if name == "no_history":
            out = tspin_no_history_loss(h, w, inp["labels"], alpha=0.7, **kw)
        else:
            out = spin_loss(h, w, inp["labels"], torch.zeros(4), beta=0.7, **kw)
        out.loss.backward()
        runs.append([out.loss, *out[1:], h.grad, w.grad, b.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_spin_formula():
    real, gen, rr, rg = (torch.randn(4, dtype=torch.float64) for _ in range(4))
    expected = _l(0.1 * ((real - rr) - (gen - rg))).mean()
    torch.testing.assert_close(spin_loss_from_logps(real, gen, rr, rg, beta=0.1), expected)


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_tspin_loss_end_to_end(impl):
    inp = make_inputs(6, 10, 16, 64, torch.float32)
    out = tspin_loss(inp["hidden"], inp["weight"], inp["labels"], alpha=0.7, beta=0.3, impl=impl)
    logps = sequence_logps(inp["hidden"], inp["weight"], inp["labels"], impl="reference")
    torch.testing.assert_close(out.real_logps, logps[:2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.generated_logps, logps[2:4], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.proto_logps, logps[4:], rtol=1e-5, atol=1e-4)
    expected = tspin_loss_from_logps(logps[:2], logps[2:4], logps[4:], alpha=0.7, beta=0.3)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert out.loss.dim() == 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_tspin_loss_gradients_match_reference(impl):
    inp = make_inputs(6, 9, 16, 48, torch.float32, bias=True)
    grads = {}
    for which in ("reference", impl):
        h, w, b = (inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
        tspin_loss(h, w, inp["labels"], bias=b, impl=which).loss.backward()
        grads[which] = (h.grad, w.grad, b.grad)
    for a, r in zip(grads[impl], grads["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_spin_loss_end_to_end(impl):
    inp = make_inputs(4, 10, 16, 64, torch.float32)
    ref_logps = torch.randn(4) - 20
    out = spin_loss(inp["hidden"], inp["weight"], inp["labels"], ref_logps, beta=0.2, impl=impl)
    logps = sequence_logps(inp["hidden"], inp["weight"], inp["labels"], impl="reference")
    expected = spin_loss_from_logps(logps[:2], logps[2:], ref_logps[:2], ref_logps[2:], beta=0.2)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)


def test_modules_match_functional():
    inp = make_inputs(6, 8, 16, 40, torch.float32, bias=True)
    args = (inp["hidden"], inp["weight"], inp["labels"])
    torch.testing.assert_close(SequenceLogps(shift=True, impl="torch")(*args, bias=inp["bias"]),
                               sequence_logps(*args, bias=inp["bias"], shift=True, impl="reference"))
    m = TSPINLoss(alpha=0.5, beta=0.2, impl="triton")
    torch.testing.assert_close(m(*args).loss, tspin_loss(*args, alpha=0.5, beta=0.2, impl="reference").loss)
    nh = TSPINNoHistoryLoss(alpha=0.5, impl="torch", fused=False)
    h = inp["hidden"].clone().requires_grad_()
    assert nh(h, *args[1:]).real_logps.requires_grad  # fused=False reached the call: differentiable log-probs
    torch.testing.assert_close(nh(*args).loss, tspin_no_history_loss(*args, alpha=0.5, impl="reference").loss)
    assert "fused=False" in repr(nh)
    ref = torch.zeros(6)
    torch.testing.assert_close(SPINLoss(beta=0.3, impl="torch")(*args, ref).loss,
                               spin_loss(*args, ref, beta=0.3, impl="reference").loss)
    assert "alpha" not in repr(m) and "impl='triton'" in repr(m)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_gradcheck_float64(impl):
    inp = make_inputs(2, 5, 6, 11, torch.float64, bias=True)
    h, w, b = (inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    fn = lambda h, w, b: sequence_logps(h, w, inp["labels"], bias=b, shift=True, impl=impl)
    assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_autocast_fp32_weight_bf16_activations(impl):
    """Mixed-precision training: fp32 master weight, autocast bf16; gradients reach the fp32 weight."""
    inp = make_inputs(3, 8, 16, 40, torch.float32)
    w = inp["weight"].clone().requires_grad_()
    h = inp["hidden"].bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sequence_logps(h, w, inp["labels"], impl=impl)
    out.sum().backward()
    ref = sequence_logps(h.detach(), w.detach().bfloat16(), inp["labels"], impl="reference")
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert w.grad is not None and w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
