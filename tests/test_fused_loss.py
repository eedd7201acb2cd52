"""The fused loss path (``fused=True``: gradients formed in the forward, one chunk of whole triplets/pairs at a
time) against the float64 oracle, on both engines (torch, Triton epilogues under the interpreter).

Tolerance rule as in test_sequence_logps: in a given dtype our error against float64 may be at most 1.5x naive
torch's error in that dtype plus a small margin. Every gradient (hidden, weight, bias), the loss and the returned
log-probs are checked; chunk caps are varied so that chunks hold several tuples, one tuple, or a tuple split into
row sub-chunks (two passes) whose boundaries fall inside sequences.
"""

import pytest
import torch

from tests._oracle import make_inputs, spy
from tests.test_counted_positions import make_positions, padded_oracle
from tspin_kernels import (
    CountedPositions,
    fused_loss,
    spin_loss,
    spin_loss_from_logps,
    tspin_loss,
    tspin_loss_from_logps,
    tspin_no_history_loss,
)
from tspin_kernels._defaults import resolve_options
from tspin_kernels._tensors import Compacted

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = ["torch", "triton"]
# name: (R, T, D, V, make_inputs options, loss options); R divisible by 6 serves triplets and pairs
CASES = {
    "odd": (6, 19, 40, 203, {}, {}),
    "shift_bias_avg": (6, 11, 33, 97, dict(bias=True), dict(shift=True, average=True)),
    "packed_empty": (6, 13, 24, 131, dict(packed=True, empty_row=2), dict(shift=True)),
    "wide_vocab": (6, 5, 16, 1100, dict(bias=True), {}),
}
ALPHA, BETA = 0.7, 0.3


def _ref_logps(R):
    return torch.linspace(-30.0, -10.0, R)


def run_loss(inputs, loss, impl, *, dtype=None, weight_grad=True, fused=None, device="cpu", **opts):
    """Forward + backward of the loss; returns (loss, logps, {name: grad}) in float64 on the CPU."""
    t = {k: (v.detach().clone().to(device, dtype or v.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
             else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    t["hidden"].requires_grad_(True)
    t["weight"].requires_grad_(weight_grad)
    if t.get("bias") is not None:
        t["bias"].requires_grad_(True)
    kw = dict(bias=t.get("bias"), cu_seqlens=t.get("cu_seqlens"), impl=impl, fused=fused, **opts)
    if loss == "tspin":
        out = tspin_loss(t["hidden"], t["weight"], t["labels"], alpha=ALPHA, beta=BETA, **kw)
    elif loss == "tspin_no_history":
        out = tspin_no_history_loss(t["hidden"], t["weight"], t["labels"], alpha=ALPHA, **kw)
    else:
        R = t["cu_seqlens"].numel() - 1 if t.get("cu_seqlens") is not None else t["hidden"].shape[0]
        out = spin_loss(t["hidden"], t["weight"], t["labels"], _ref_logps(R).to(device), beta=BETA, **kw)
    (out.loss * 1.7).backward()  # an incoming gradient other than 1: the backward must scale
    grads = {k: t[k].grad.double().cpu() for k in ("hidden", "weight", "bias") if t.get(k) is not None
             and t[k].grad is not None}
    return out.loss.detach().double().cpu(), torch.cat(out[1:]).detach().double().cpu(), grads


def _err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def check_fused(case, loss, impl, dtype, weight_grad=True, device="cpu", **opts):
    """``opts`` (chunk_elements=, ...) go to the fused path only; the oracle and naive run on ``device`` too."""
    R, T, D, V, mk, lo = case
    inputs = make_inputs(R, T, D, V, torch.float64, **mk)
    kw = dict(weight_grad=weight_grad, device=device, **lo)
    ref = run_loss(inputs, loss, "reference", **kw)
    base = run_loss(inputs, loss, "reference", dtype=dtype, **kw)
    ours = run_loss(inputs, loss, impl, dtype=dtype, fused=True, **kw, **opts)
    assert_within_rule(ours, base, ref, dtype)


def assert_within_rule(ours, base, ref, dtype):
    """(loss, logps, {name: grad}) of ours and of naive torch in ``dtype`` against the float64 ``ref``."""
    factor, margin = (1.5, 1e-5) if dtype == torch.float32 else (1.5, 2e-3)
    named = [("loss", ours[0], base[0], ref[0]), ("logps", ours[1], base[1], ref[1])]
    assert set(ours[2]) == set(ref[2]), f"gradients present {set(ours[2])} vs {set(ref[2])}"
    named += [(f"grad {name}", ours[2][name], base[2][name], r) for name, r in ref[2].items()]
    for what, a, b, r in named:
        scale = max(1.0, r.abs().max().item())
        assert _err(a, r) <= factor * _err(b, r) + margin * scale, f"{what}: err {_err(a, r)} vs naive {_err(b, r)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", ["tspin", "spin", "tspin_no_history"])
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_fused_against_float64_oracle(case, loss, impl, dtype):
    check_fused(CASES[case], loss, impl, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_frozen_head(impl, dtype):
    check_fused(CASES["shift_bias_avg"], "tspin", impl, dtype, weight_grad=False)


# chunk caps in logit elements for V=203 and ~9-13 counted rows per sequence (~30 per triplet):
# 10**6: every triplet in one chunk; 40*203: one triplet per chunk, or a triplet split into two passes;
# 7*203: every triplet in sub-chunks of 7 rows that straddle sequence boundaries.
@pytest.mark.parametrize("cap", [10**6, 40 * 203, 7 * 203], ids=["all", "one_triplet", "sub_chunks"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_chunk_boundaries(cap, impl, dtype):
    check_fused((6, 19, 40, 203, dict(bias=True), {}), "tspin", impl, dtype, chunk_elements=cap)
    check_fused((6, 19, 40, 203, dict(packed=True), dict(average=True)), "spin", impl, dtype, chunk_elements=cap)


def _logit_rows(monkeypatch, **opts):
    """Rows whose logits the fused path computes, per call of ``_chunk_logits`` (its one logits product)."""
    seen = []
    spy(monkeypatch, fused_loss, "_chunk_logits", lambda h, *a: seen.append(h.shape[0]))
    inp = make_inputs(6, 19, 40, 203, torch.float32)
    h, w = inp["hidden"].requires_grad_(), inp["weight"].requires_grad_()
    tspin_loss(h, w, inp["labels"], impl="torch", fused=True, **opts).loss.backward()
    counted = int((inp["labels"] != -100).sum())
    return seen, counted


def test_three_units_one_logits_product_per_row(monkeypatch):
    """A chunk that fits computes each counted row's logits once (the products follow from the same buffer);
    a triplet over the cap computes them twice (two passes), only for that triplet."""
    seen, counted = _logit_rows(monkeypatch)
    assert sum(seen) == counted and len(seen) == 1
    seen, counted = _logit_rows(monkeypatch, chunk_elements=7 * 203)
    assert sum(seen) == 2 * counted and max(seen) <= 7
    monkeypatch.setenv("TSPIN_CHUNK_ELEMENTS", str(7 * 203))  # the variable sets the fused path's cap too
    seen, counted = _logit_rows(monkeypatch)
    assert sum(seen) == 2 * counted and max(seen) <= 7
    seen, counted = _logit_rows(monkeypatch, chunk_elements=10**6)  # an explicit cap wins
    assert sum(seen) == counted


def test_plan_chunks():
    plan = fused_loss.plan_chunks
    # target closes a chunk once reached; the cap keeps a tuple out; a tuple over the cap stands alone
    assert plan([3, 3, 3, 3], V=10, cap=100, target=60) == [(0, 6, 0, 2), (6, 12, 2, 4)]
    assert plan([3, 3, 3, 3], V=10, cap=50, target=1000) == [(0, 3, 0, 1), (3, 6, 1, 2), (6, 9, 2, 3),
                                                              (9, 12, 3, 4)]
    assert plan([3, 3, 3, 3], V=10, cap=65, target=1000) == [(0, 6, 0, 2), (6, 12, 2, 4)]
    assert plan([2, 9, 1, 0], V=10, cap=50, target=1000) == [(0, 2, 0, 1), (2, 11, 1, 2), (11, 12, 2, 4)]
    assert plan([0, 0], V=10, cap=50, target=1000) == [(0, 0, 0, 2)]
    for counts in ([5, 0, 7, 2, 9], [1] * 9, [40]):
        chunks = plan(counts, V=7, cap=70, target=35)
        assert [c[2] for c in chunks] == [0] + [c[3] for c in chunks[:-1]] and chunks[-1][3] == len(counts)
        assert chunks[-1][1] == sum(counts)
        assert all((p1 - p0) * 7 <= 70 or t1 - t0 == 1 for p0, p1, t0, t1 in chunks)


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_rows_accumulate(impl):
    """A counted row may serve several positions (shared-prefix layout: the last prompt row predicts the first token
    of each response): its gradient is the sum over its uses, as with the row duplicated."""
    g = torch.Generator().manual_seed(3)
    D, V, B = 16, 50, 2
    base = torch.randn(10, D, generator=g, dtype=torch.float64)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) / 4).float()
    # positions (row, target, sequence): rows 0 and 5 are shared by the three sequences of triplets 0 and 1
    rows = torch.tensor([0, 1, 0, 2, 0, 3, 5, 6, 5, 7, 5, 8, 9])
    seqs = torch.tensor([0, 0, 2, 2, 4, 4, 1, 1, 3, 3, 5, 5, 5])
    target = torch.randint(0, V, (rows.numel(),), generator=g)
    spec = fused_loss.TupleLoss(3, lambda x, t: torch.nn.functional.softplus(x[1] - x[0]) + 0.3 * x[2] ** 2 / 100)
    opts = resolve_options(chunk_elements=4 * V)  # two-pass sub-chunks too

    hidden = base.float().requires_grad_()
    w = weight.clone().requires_grad_()
    c = Compacted(hidden, rows, target, seqs, torch.ones(rows.numel()), 3 * B)
    loss, logps = fused_loss.run_fused(spec, c, w, None, impl, opts)
    loss.backward()

    dup = base[rows].float().requires_grad_()  # every position its own row
    w2 = weight.clone().requires_grad_()
    c2 = Compacted(dup, torch.arange(rows.numel()), target, seqs, torch.ones(rows.numel()), 3 * B)
    loss2, logps2 = fused_loss.run_fused(spec, c2, w2, None, "torch", resolve_options())
    loss2.backward()
    want = torch.zeros_like(hidden).index_add_(0, rows, dup.grad)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(logps, logps2)
    torch.testing.assert_close(hidden.grad, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_only_the_loss_is_differentiable():
    inp = make_inputs(6, 9, 16, 48, torch.float32)
    h = inp["hidden"].requires_grad_()
    out = tspin_loss(h, inp["weight"], inp["labels"], impl="torch", fused=True)
    assert out.loss.requires_grad
    assert not any(x.requires_grad for x in out[1:]), "fused log-probs are detached diagnostics"
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.real_logps.sum().backward()
    recompute = tspin_loss(h, inp["weight"], inp["labels"], impl="torch", fused=False)
    assert all(x.requires_grad for x in recompute)
    torch.testing.assert_close(torch.cat(out[1:]), torch.cat(recompute[1:]).detach())


def test_backward_once_and_first_order_only():
    inp = make_inputs(6, 9, 16, 48, torch.float32)
    h = inp["hidden"].requires_grad_()
    loss = tspin_loss(h, inp["weight"], inp["labels"], impl="torch", fused=True).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run once per forward.*fused=False"):
        loss.backward()
    loss = tspin_loss(h, inp["weight"], inp["labels"], impl="torch", fused=True).loss
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_no_gradient_work_without_grad(monkeypatch):
    """Under no_grad (evaluation) or with nothing requiring grad, the fused path does only the logits product."""
    calls = []
    spy(monkeypatch, fused_loss, "_accumulate", lambda *a, **k: calls.append(1))
    inp = make_inputs(6, 9, 16, 48, torch.float32)
    h = inp["hidden"].requires_grad_()
    with torch.no_grad():
        a = tspin_loss(h, inp["weight"], inp["labels"], impl="torch", fused=True).loss
    b = tspin_loss(h.detach(), inp["weight"], inp["labels"], impl="torch", fused=True).loss
    assert calls == [] and not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, tspin_loss(h, inp["weight"], inp["labels"], impl="reference").loss)


def _path(monkeypatch, **kw):
    from tspin_kernels import functional

    used = []
    spy(monkeypatch, functional, "run_fused", lambda *a, **k: used.append("fused"))
    inp = make_inputs(6, 5, 8, 20, torch.float32)
    tspin_loss(inp["hidden"], inp["weight"], inp["labels"], **kw)
    spin_loss(inp["hidden"], inp["weight"], inp["labels"], torch.zeros(6), **kw)
    return used


def test_default_path_and_environment(monkeypatch):
    assert _path(monkeypatch, impl="torch") == ["fused", "fused"]  # measured faster on CPU
    assert _path(monkeypatch, impl="triton") == []  # the GPU default stays until a GPU measurement
    assert _path(monkeypatch, impl="reference") == []
    assert _path(monkeypatch, impl="torch", fused=False) == []
    assert _path(monkeypatch, impl="triton", fused=True) == ["fused", "fused"]
    monkeypatch.setenv("TSPIN_FUSED", "0")
    assert _path(monkeypatch, impl="torch") == []
    assert _path(monkeypatch, impl="torch", fused=True) == ["fused", "fused"]
    monkeypatch.setenv("TSPIN_FUSED", "1")
    assert _path(monkeypatch, impl="triton") == ["fused", "fused"]
    assert _path(monkeypatch, impl="reference") == []  # the oracle has no fused path; the variable is a default
    monkeypatch.setenv("TSPIN_FUSED", "maybe")
    with pytest.raises(ValueError, match="TSPIN_FUSED: expected"):
        _path(monkeypatch, impl="torch")


def test_bad_fused_option():
    inp = make_inputs(6, 5, 8, 20, torch.float32)
    with pytest.raises(TypeError, match="fused: expected None, True or False"):
        tspin_loss(inp["hidden"], inp["weight"], inp["labels"], fused="yes")
    with pytest.raises(ValueError, match="fused: impl='reference' is the full-logits oracle"):
        spin_loss(inp["hidden"], inp["weight"], inp["labels"], torch.zeros(6), impl="reference", fused=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_fp32_master_weight(impl):
    """Mixed precision: fp32 master weight, bf16 autocast; the fused path's gradients reach the fp32 weight."""
    inp = make_inputs(6, 8, 16, 40, torch.float32)
    w = inp["weight"].clone().requires_grad_()
    h = inp["hidden"].bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tspin_loss(h, w, inp["labels"], impl=impl, fused=True)
    out.loss.backward()
    w16 = w.detach().bfloat16().requires_grad_()
    ref = tspin_loss(h.detach(), w16, inp["labels"], impl="torch", fused=False)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-3, atol=1e-3)
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(w.grad, w16.grad.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# Counted positions (the shared-prefix layout): rows that repeat, against the float64 padded oracle
# ---------------------------------------------------------------------------------------------------------------

# name: (N, D, V, S, triples, options), S = 6 sequences: two triplets or three pairs
POSITION_CASES = {
    "odd": (23, 40, 203, 6, 37, {}),
    "bias_avg": (11, 33, 97, 6, 25, dict(bias=True, average=True)),
    "hot_row": (9, 24, 131, 6, 70, dict(hot=40)),  # one row counted 40 times, in every sequence
    "empty_seq": (12, 16, 67, 6, 15, dict(empty_seq=2, average=True)),
}


def _positions_run(inputs, loss, fn, dtype, weight_grad=True, average=False):
    """(loss, logps, grads) in float64 of ``fn(hidden, weight, positions, bias) -> (loss, logps)``."""
    t = {k: (v.detach().to(dtype).clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    t["hidden"].requires_grad_(True)
    t["weight"].requires_grad_(weight_grad)
    if t["bias"] is not None:
        t["bias"].requires_grad_(True)
    out, logps = fn(t["hidden"], t["weight"], t["positions"], t["bias"], average)
    (out * 1.7).backward()
    grads = {k: t[k].grad.double() for k in ("hidden", "weight", "bias") if t[k] is not None and t[k].grad is not None}
    return out.detach().double(), logps.detach().double(), grads


def _oracle_loss(loss):
    """The padded oracle's log-probs (each triple's hidden row gathered into its sequence's row, so a repeated row
    becomes copies whose gradients autograd sums), then the loss formula on them."""
    def fn(h, w, pos, b, average):
        lp = padded_oracle(h, w, pos, bias=b, average=average).float()
        if loss == "tspin":
            return tspin_loss_from_logps(*lp.chunk(3), alpha=ALPHA, beta=BETA), lp
        return spin_loss_from_logps(*lp.chunk(2), *_ref_logps(lp.numel()).chunk(2), beta=BETA), lp
    return fn


def _fused_positions_loss(loss, impl, **opts):
    def fn(h, w, pos, b, average):
        if loss == "tspin":
            out = tspin_loss(h, w, pos, bias=b, average=average, alpha=ALPHA, beta=BETA, impl=impl, fused=True, **opts)
        else:
            out = spin_loss(h, w, pos, _ref_logps(pos.num_seqs), bias=b, average=average, beta=BETA, impl=impl,
                            fused=True, **opts)
        return out.loss, torch.cat(out[1:])
    return fn


def check_positions(case, loss, impl, dtype, weight_grad=True, **opts):
    N, D, V, S, n, o = case
    o = dict(o)
    average = o.pop("average", False)
    inputs = make_positions(N, D, V, S, n, **o)
    ref = _positions_run(inputs, loss, _oracle_loss(loss), torch.float64, weight_grad, average)
    base = _positions_run(inputs, loss, _oracle_loss(loss), dtype, weight_grad, average)
    ours = _positions_run(inputs, loss, _fused_positions_loss(loss, impl, **opts), dtype, weight_grad, average)
    assert_within_rule(ours, base, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", ["tspin", "spin"])
@pytest.mark.parametrize("case", list(POSITION_CASES), ids=str)
def test_counted_positions_against_float64_padded_oracle(case, loss, impl, dtype):
    check_positions(POSITION_CASES[case], loss, impl, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_counted_positions_frozen_head_and_two_pass_chunks(impl, dtype):
    """The hot row's repeats land in different row sub-chunks of a two-pass triplet (cap of 3 rows)."""
    case = POSITION_CASES["hot_row"]
    check_positions(case, "tspin", impl, dtype, weight_grad=False)
    check_positions(case, "tspin", impl, dtype, chunk_elements=3 * case[2])
    check_positions(case, "spin", impl, dtype, chunk_elements=3 * case[2])


# ---------------------------------------------------------------------------------------------------------------
# seq_counts: the caller's plan of the chunks
# ---------------------------------------------------------------------------------------------------------------


def _counts_of(labels, cu_seqlens=None, shift=True):
    """Counted positions per sequence, on the host, as a caller counts them while building the batch."""
    if isinstance(labels, CountedPositions):
        return torch.zeros(labels.num_seqs, dtype=torch.long).index_add_(
            0, labels.seq_ids, torch.ones_like(labels.seq_ids)).tolist()
    rows = labels.split(torch.diff(cu_seqlens).tolist()) if cu_seqlens is not None else labels
    return [int((r[1:] if shift else r).ne(-100).sum()) for r in rows]


@pytest.mark.parametrize("rows_per_chunk", [None, 6, 14], ids=["one_chunk", "sub_chunks", "tuple_chunks"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["padded", "packed", "positions"])
def test_seq_counts_give_the_same_results(impl, layout, rows_per_chunk):
    """Chunk caps of a few rows make the plan depend on every count (which tuple each chunk holds, which tuples
    take two passes): counts read from the device and counts given by the caller must give identical results."""
    if layout == "positions":
        p = make_positions(12, 16, 67, 6, 30, hot=5)
        h, w, labels, kw = p["hidden"].float(), p["weight"].float(), p["positions"], {}
    else:
        inp = make_inputs(6, 13, 24, 131, torch.float32, packed=layout == "packed", empty_row=2)
        h, w, labels = inp["hidden"], inp["weight"], inp["labels"]
        kw = dict(cu_seqlens=inp.get("cu_seqlens"), shift=True)
    if rows_per_chunk:
        kw["chunk_elements"] = rows_per_chunk * w.shape[0]
    counts = _counts_of(labels, kw.get("cu_seqlens"))
    for loss in ("tspin", "spin"):
        outs = []
        for fused, given in ((False, None), (True, None), (True, counts), (True, torch.tensor(counts))):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            if loss == "tspin":
                out = tspin_loss(hh, ww, labels, impl=impl, fused=fused, seq_counts=given, validate=False, **kw)
            else:
                out = spin_loss(hh, ww, labels, _ref_logps(6), impl=impl, fused=fused, seq_counts=given,
                                validate=False, **kw)
            out.loss.backward()
            outs.append((out.loss, torch.cat(out[1:]), hh.grad, ww.grad))
        for a, b in zip(outs[0], outs[1]):  # the fused path itself, against the recompute path
            torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
        for other in outs[2:]:  # the caller's plan: exactly the plan read from the device
            for a, b in zip(outs[1], other):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_seq_counts_are_checked():
    inp = make_inputs(6, 13, 24, 131, torch.float32)
    h, w, lab = inp["hidden"], inp["weight"], inp["labels"]
    counts = _counts_of(lab, shift=False)

    def call(seq_counts, validate=False, fused=True):
        return tspin_loss(h, w, lab, impl="torch", fused=fused, seq_counts=seq_counts, validate=validate)

    with pytest.raises(ValueError, match=r"seq_counts: expected one count per sequence \(6\), got 5"):
        call(counts[:5])
    with pytest.raises(ValueError, match="seq_counts: counts must be >= 0"):
        call([-1] + counts[1:])
    with pytest.raises(TypeError, match="seq_counts: expected a list or tuple of ints"):
        call([float(c) for c in counts])
    with pytest.raises(TypeError, match="seq_counts: expected host integers"):
        call(torch.tensor(counts, dtype=torch.float32))
    with pytest.raises(ValueError, match="seq_counts: expected one count per sequence"):
        call(counts[:5], fused=False)  # checked on the recompute path too (free), though unused there
    # the total is checked always (free: the host knows how many positions count)
    with pytest.raises(ValueError, match=r"seq_counts: they add up to \d+ counted positions, the labels hold \d+"):
        call([c + 1 for c in counts])
    # a wrong split with the right total: only validate=True (which reads the counts) can see it
    moved = [counts[0] + 1, counts[1] - 1] + counts[2:]
    with pytest.raises(ValueError, match=f"seq_counts: sequence 0 has {counts[0]} counted positions in the labels, "
                                         f"seq_counts says {counts[0] + 1}"):
        call(moved, validate=True)
    call(moved, validate=False)  # the caller vouched: no read, no check (undefined gradients, documented)
    call(counts, validate=True)
