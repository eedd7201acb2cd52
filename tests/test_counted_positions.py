"""Explicit counted positions (``CountedPositions``): rows that repeat, in every implementation and dtype.

The oracle is the padded layout in float64: every triple's hidden row is gathered into its sequence's padded row
(so a repeated row becomes several copies, and autograd sums their gradients back), then the naive full-logits
path. It shares no index logic with the kernels' compaction or their gradient slots. The tolerance rule is the
one of test_sequence_logps: no worse than naive torch in the same dtype, times 1.5, plus a small margin.
"""

import pytest
import torch

from tests.test_sequence_logps import _max_err
from tspin_kernels import CountedPositions, sequence_logps, spin_loss, tspin_loss
from tspin_kernels.positions import first_occurrence
from tspin_kernels.reference import naive_sequence_logps

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = ["torch", "triton", "reference"]
CASES = {
    # name: (N, D, V, S, triples, options)
    "odd": (23, 40, 203, 5, 37, {}),
    "bias_avg": (11, 33, 97, 4, 25, dict(bias=True, average=True)),
    "splits": (7, 16, 1100, 3, 12, {}),  # few rows, wide vocab: several vocab splits in the forward
    "hot_row": (9, 24, 131, 6, 70, dict(hot=40)),  # one row counted 40 times: across row blocks and chunks
    "empty_seq": (12, 16, 67, 4, 15, dict(empty_seq=2, average=True)),
}


def make_positions(N, D, V, S, n, *, bias=False, hot=0, empty_seq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64) * 2.0
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    rows = torch.randint(0, N, (n,), generator=g)
    rows[:hot] = N // 2
    rows = rows[torch.randperm(n, generator=g)]  # the repeats of the hot row are spread over the whole list
    seq_ids = torch.randint(0, S, (n,), generator=g)
    if empty_seq is not None:
        seq_ids[seq_ids == empty_seq] = (empty_seq + 1) % S
    targets = torch.randint(0, V, (n,), generator=g)
    return dict(hidden=hidden, weight=weight, bias=b, positions=CountedPositions(rows, targets, seq_ids, S))


def padded_oracle(hidden, weight, positions, *, bias=None, average=False):
    """Each sequence's triples as one padded row of gathered hidden states, then the naive padded path."""
    S = positions.num_seqs
    members = [(positions.seq_ids == s).nonzero().squeeze(1) for s in range(S)]
    T = max(1, max(m.numel() for m in members))
    index = torch.zeros(S, T, dtype=torch.long)
    labels = torch.full((S, T), -100, dtype=torch.long)
    for s, m in enumerate(members):
        index[s, : m.numel()] = positions.rows[m]
        labels[s, : m.numel()] = positions.targets[m]
    return naive_sequence_logps(hidden[index], weight, labels, bias=bias, average=average)


def run(inputs, fn, dtype, weight_grad=True, **opts):
    t = {k: (v.detach().to(dtype).clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    t["hidden"].requires_grad_(True)
    t["weight"].requires_grad_(weight_grad)
    if t["bias"] is not None:
        t["bias"].requires_grad_(True)
    out = fn(t["hidden"], t["weight"], t["positions"], bias=t["bias"], **opts)
    (out * torch.linspace(-1.0, 2.0, out.numel()).to(out)).sum().backward()
    grads = {k: t[k].grad.double() for k in ("hidden", "weight", "bias") if t[k] is not None and t[k].grad is not None}
    return out.detach().double(), grads


def check(case, impl, dtype, weight_grad=True, **kernel_options):
    N, D, V, S, n, opts = case
    opts = dict(opts)
    inputs = make_positions(N, D, V, S, n, **{k: opts.pop(k) for k in ("bias", "hot", "empty_seq") if k in opts})
    ref_out, ref_g = run(inputs, padded_oracle, torch.float64, weight_grad, **opts)
    base_out, base_g = run(inputs, padded_oracle, dtype, weight_grad, **opts)
    out, g = run(inputs, lambda *a, **k: sequence_logps(*a, impl=impl, **k, **kernel_options), dtype, weight_grad,
                 **opts)
    factor, margin = (1.5, 1e-5) if dtype == torch.float32 else (1.5, 2e-3)
    e, e0 = _max_err(out, ref_out), _max_err(base_out, ref_out)
    assert e <= factor * e0 + margin * max(1.0, ref_out.abs().max().item()), f"logps err {e} vs naive {e0}"
    assert set(g) == set(ref_g)
    for name in ref_g:
        e, e0 = _max_err(g[name], ref_g[name]), _max_err(base_g[name], ref_g[name])
        assert e <= factor * e0 + margin * max(1.0, ref_g[name].abs().max().item()), f"grad {name}: {e} vs {e0}"
    return inputs, out, g


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_repeated_rows_against_float64_padded_oracle(case, impl, dtype):
    check(CASES[case], impl, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_reference_impl_with_repeated_rows(case, dtype):
    """impl="reference" is itself naive torch (16-bit logits, as a HF loop computes them), so it is held to the
    oracle in float32 and float64, where it must agree to rounding."""
    check(CASES[case], "reference", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ["odd", "hot_row"])
def test_repeated_rows_matmul_backward(monkeypatch, case, dtype):
    """backward="matmul" adds a repeated row's products into its slot with index_add; small blocks force several
    vocab slices and row chunks, so the repeats of the hot row land in different chunks."""
    from tspin_kernels.kernels import fused_logps

    monkeypatch.setattr(fused_logps, "GW_SCRATCH_ELEMENTS", 2 * 32 * CASES[case][1])
    monkeypatch.setattr(fused_logps, "DL_BLOCK_ELEMENTS", 64 * 32)
    check(CASES[case], "triton", dtype, backward="matmul")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_repeated_rows_frozen_head_and_small_chunks(impl, dtype):
    check(CASES["hot_row"], impl, dtype, weight_grad=False)
    check(CASES["hot_row"], impl, dtype, chunk_elements=3 * CASES["hot_row"][2])  # torch path: 3-row chunks


def test_gradient_of_a_repeated_row_is_the_sum_over_its_repeats():
    """The defining property, stated directly: counting a row twice for one sequence doubles its log-prob and
    its gradient; counting it for two sequences gives each sequence its own log-prob."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g)
    for impl in ("torch", "triton"):
        once = CountedPositions(torch.tensor([2]), torch.tensor([5]), torch.tensor([0]), 1)
        twice = CountedPositions(torch.tensor([2, 2]), torch.tensor([5, 5]), torch.tensor([0, 0]), 1)
        split = CountedPositions(torch.tensor([2, 2]), torch.tensor([5, 5]), torch.tensor([0, 1]), 2)
        (g1,) = torch.autograd.grad(sequence_logps(h, w, once, impl=impl).sum(), h)
        out2 = sequence_logps(h, w, twice, impl=impl)
        (g2,) = torch.autograd.grad(out2.sum(), h)
        out3 = sequence_logps(h, w, split, impl=impl)
        torch.testing.assert_close(out2, 2 * sequence_logps(h, w, once, impl=impl))
        torch.testing.assert_close(g2, 2 * g1)
        torch.testing.assert_close(out3, sequence_logps(h, w, once, impl=impl).repeat(2))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_positions_from_labels_equal_the_labels_path(impl):
    """Without repeats, the triples built from padded labels give exactly the labels path's results."""
    g = torch.Generator().manual_seed(1)
    R, T, D, V = 4, 9, 16, 50
    h = torch.randn(R, T, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    lab = torch.randint(0, V, (R, T), generator=g)
    lab[:, :3] = -100
    counted = (lab != -100).reshape(-1).nonzero().squeeze(1)
    pos = CountedPositions(counted, lab.reshape(-1)[counted], counted // T, R)
    a = sequence_logps(h, w, lab, impl=impl)
    b = sequence_logps(h, w, pos, impl=impl)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ga = torch.autograd.grad(a.sum(), (h, w))
    gb = torch.autograd.grad(b.sum(), (h, w))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_first_occurrence():
    rows = torch.tensor([5, 3, 5, 7, 3, 5, 0])
    assert first_occurrence(rows).tolist() == [0, 1, 0, 3, 1, 0, 6]
    assert first_occurrence(torch.zeros(0, dtype=torch.long)).numel() == 0


def test_losses_take_counted_positions():
    """tspin_loss / spin_loss count sequences from num_seqs (3B / 2B) and go through one call."""
    inputs = make_positions(10, 16, 40, 6, 30)
    h, w, pos = inputs["hidden"].float(), inputs["weight"].float(), inputs["positions"]
    logps = sequence_logps(h, w, pos, impl="torch")
    out = tspin_loss(h, w, pos, impl="torch")
    torch.testing.assert_close(torch.cat([out.real_logps, out.generated_logps, out.proto_logps]), logps)
    ref = torch.zeros(6)
    s = spin_loss(h, w, pos, ref, impl="torch")
    torch.testing.assert_close(torch.cat([s.real_logps, s.generated_logps]), logps)
    with pytest.raises(ValueError, match="tspin_loss needs 3B rows"):
        tspin_loss(h, w, pos._replace(num_seqs=4), impl="torch")


def _bad_cases():
    pos = CountedPositions(torch.tensor([0, 4, 4]), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1]), 2)
    return {
        "row_out_of_range": (pos._replace(rows=torch.tensor([0, 4, 10])), {}, ValueError,
                             r"labels.rows: values must be in \[0, 10\), found 10"),
        "negative_target": (pos._replace(targets=torch.tensor([1, -1, 3])), {}, ValueError,
                            r"labels.targets: values must be in \[0, 20\), found -1"),
        "seq_out_of_range": (pos._replace(seq_ids=torch.tensor([0, 1, 2])), {}, ValueError,
                             r"labels.seq_ids: values must be in \[0, 2\), found 2"),
        "float_rows": (pos._replace(rows=pos.rows.float()), {}, TypeError, "labels.rows: expected an integer dtype"),
        "2d_targets": (pos._replace(targets=pos.targets[None]), {}, ValueError, "labels.targets: expected a 1-D"),
        "length_mismatch": (pos._replace(seq_ids=torch.tensor([0, 1])), {}, ValueError,
                            "labels.seq_ids: expected 3 entries"),
        "num_seqs_zero": (pos._replace(num_seqs=0), {}, ValueError, "labels.num_seqs: expected at least 1"),
        "num_seqs_float": (pos._replace(num_seqs=2.0), {}, TypeError, "labels.num_seqs: expected an int"),
        "rows_list": (pos._replace(rows=[0, 4, 4]), {}, TypeError, "labels.rows: expected a 1-D integer"),
        "shift": (pos, dict(shift=True), ValueError, "shift: counted positions already name the row"),
        "cu_seqlens": (pos, dict(cu_seqlens=torch.tensor([0, 10])), ValueError,
                       "cu_seqlens: counted positions address hidden rows directly"),
        "meta_rows": (pos._replace(rows=pos.rows.to("meta")), {}, ValueError, "labels.rows: expected to be on cpu"),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(_bad_cases()), ids=str)
def test_bad_positions_name_the_field(case, impl):
    pos, kw, exc, match = _bad_cases()[case]
    h, w = torch.randn(10, 8), torch.randn(20, 8)
    with pytest.raises(exc, match=match):
        sequence_logps(h, w, pos, impl=impl, **kw)


def test_validate_false_skips_only_the_value_checks():
    h, w = torch.randn(10, 8), torch.randn(20, 8)
    pos = CountedPositions(torch.tensor([0, 4, 4]), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1]), 2)
    torch.testing.assert_close(sequence_logps(h, w, pos, validate=False), sequence_logps(h, w, pos))
    with pytest.raises(TypeError, match="labels.rows"):
        sequence_logps(h, w, pos._replace(rows=pos.rows.float()), validate=False)
