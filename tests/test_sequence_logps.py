"""Every output and gradient of the triton and torch paths against a float64 oracle.

Tolerance rule (as cut-cross-entropy does it): in a given dtype, our error against float64 may be no larger
than the error of naive torch in that same dtype, times a small factor, plus a small absolute margin.
"""

import pytest
import torch

from tests._oracle import make_inputs, run

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = ["torch", "triton"]
CASES = {
    # name: (R, T, D, V, options)
    "odd": (6, 19, 40, 203, {}),
    "shift": (3, 17, 24, 157, dict(shift=True)),
    "bias_avg": (3, 11, 33, 97, dict(bias=True, average=True)),
    "splits": (3, 6, 16, 1100, {}),  # few rows, wide vocab: several vocab splits in the forward
    "packed": (6, 13, 24, 131, dict(packed=True, shift=True)),
    "empty_row": (3, 9, 16, 67, dict(empty_row=1, average=True)),
}


def _max_err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def check_against_oracle(case, impl, dtype, weight_grad=True, device="cpu", **kernel_options):
    """``kernel_options`` (backward=, tiles=, ...) go to the implementation under test only."""
    R, T, D, V, opts = case
    opts = dict(opts)
    mk = {k: opts.pop(k) for k in ("bias", "packed", "empty_row") if k in opts}
    inputs = make_inputs(R, T, D, V, torch.float64, **mk)
    kw = dict(weight_grad=weight_grad, device=device, **opts)
    ref_out, ref_g = run(inputs, "naive", **kw)
    base_out, base_g = run(inputs, "naive", dtype=dtype, **kw)
    out, g = run(inputs, impl, dtype=dtype, **kw, **kernel_options)
    factor, margin = (1.5, 1e-5) if dtype == torch.float32 else (1.5, 2e-3)
    e, e0 = _max_err(out, ref_out), _max_err(base_out, ref_out)
    assert e <= factor * e0 + margin * max(1.0, ref_out.abs().max().item()), f"logps err {e} vs naive {e0}"
    assert set(g) == set(ref_g), f"gradients present {set(g)} vs {set(ref_g)}"
    for name in ref_g:
        e, e0 = _max_err(g[name], ref_g[name]), _max_err(base_g[name], ref_g[name])
        scale = max(1.0, ref_g[name].abs().max().item())
        assert e <= factor * e0 + margin * scale, f"grad {name}: err {e} vs naive {e0}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_against_float64_oracle(case, impl, dtype):
    check_against_oracle(CASES[case], impl, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_frozen_head(impl, dtype):
    check_against_oracle(CASES["odd"], impl, dtype, weight_grad=False)


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
def test_fully_ignored_row_and_batch(impl):
    inp = make_inputs(3, 8, 16, 50, torch.float32, empty_row=0)
    for average in (False, True):
        out, g = run(inp, impl, average=average)
        assert out[0].item() == 0.0 and torch.isfinite(out).all()
        assert torch.all(g["hidden"][0] == 0), "an ignored row must get no gradient"
    inp["labels"][:] = -100
    out, g = run(inp, impl, average=True)
    assert torch.all(out == 0) and torch.all(g["hidden"] == 0) and torch.all(g["weight"] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    from tspin_kernels import sequence_logps

    inp = make_inputs(4, 10, 24, 80, torch.float32)
    h_big = torch.randn(4, 10, 48)
    h_big[..., ::2] = inp["hidden"]
    h = h_big[..., ::2]  # strided last dim
    w = inp["weight"].T.contiguous().T  # column-major weight
    ref = sequence_logps(inp["hidden"], inp["weight"], inp["labels"], impl="reference")
    torch.testing.assert_close(sequence_logps(h, w, inp["labels"], impl=impl), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_shift_matches_manual_alignment(impl):
    from tspin_kernels import sequence_logps

    inp = make_inputs(3, 12, 16, 60, torch.float32)
    h, w, lab = inp["hidden"], inp["weight"], inp["labels"]
    shifted = sequence_logps(h, w, lab, shift=True, impl=impl)
    manual = sequence_logps(h[:, :-1].contiguous(), w, lab[:, 1:].contiguous(), impl=impl)
    torch.testing.assert_close(shifted, manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_equals_padded(impl):
    from tspin_kernels import sequence_logps

    inp = make_inputs(4, 9, 16, 70, torch.float32)
    padded = sequence_logps(inp["hidden"], inp["weight"], inp["labels"], shift=True, impl=impl)
    cu = torch.arange(0, 37, 9)
    packed = sequence_logps(inp["hidden"].reshape(36, 16), inp["weight"], inp["labels"].reshape(36), cu_seqlens=cu,
                            shift=True, impl=impl)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_int32_labels_and_custom_ignore_index():
    from tspin_kernels import sequence_logps

    inp = make_inputs(2, 8, 16, 40, torch.float32)
    lab = inp["labels"].masked_fill(inp["labels"] == -100, -1).int()
    ref = sequence_logps(inp["hidden"], inp["weight"], inp["labels"], impl="reference")
    for impl in IMPLS:
        torch.testing.assert_close(sequence_logps(inp["hidden"], inp["weight"], lab, ignore_index=-1, impl=impl), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_triton_weight_grad_in_vocab_slices(monkeypatch, dtype):
    """16-bit heads accumulate the weight gradient one vocab slice at a time (a float32 scratch of
    GW_SCRATCH_ELEMENTS); shrink it so V=203 takes several slices, one of them partial, and check against float64."""
    from tspin_kernels.kernels import fused_logps

    R, T, D, V, _ = CASES["odd"]
    monkeypatch.setattr(fused_logps, "GW_SCRATCH_ELEMENTS", 2 * 32 * D)  # two interpreter tiles (BLOCK_N=32)
    slices = fused_logps._vocab_slices(V, D, 32, True, dtype)
    if dtype == torch.float32:
        assert slices == [(0, V)]  # a float32 head accumulates straight into its gradient
    else:
        assert len(slices) == 4 and slices[-1] == (192, V)
    check_against_oracle((R, T, D, V, dict(bias=True)), "triton", dtype)
    check_against_oracle((R, T, D, V, {}), "triton", dtype, weight_grad=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_matmul_backward_against_float64_oracle(monkeypatch, case, dtype):
    """backward="matmul": dlogits blocks + matmuls instead of atomics; small blocks force several slices and
    row chunks (one of each partial)."""
    from tspin_kernels.kernels import fused_logps

    monkeypatch.setattr(fused_logps, "GW_SCRATCH_ELEMENTS", 2 * 32 * CASES[case][2])  # 64-column slices
    monkeypatch.setattr(fused_logps, "DL_BLOCK_ELEMENTS", 64 * 32)  # 32-row chunks
    check_against_oracle(CASES[case], "triton", dtype, backward="matmul")


def test_matmul_backward_frozen_head_and_filter_conflict():
    check_against_oracle(CASES["odd"], "triton", torch.bfloat16, weight_grad=False, backward="matmul")
    with pytest.raises(ValueError, match="grad_filter_eps: skips tiles of the atomic backward only"):
        check_against_oracle(CASES["odd"], "triton", torch.float32, backward="matmul", grad_filter_eps=1e-4)
    with pytest.raises(ValueError, match="backward: expected one of"):
        check_against_oracle(CASES["odd"], "triton", torch.float32, backward="fast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
def test_torch_path_slices_the_float32_weight(dtype):
    """16-bit heads on the CPU torch path: float32 logits from a weight upcast one vocab slice of chunk_elements at a
    time. Small budgets make many slices (the last partial) and one- or two-row chunks; checked against float64."""
    R, T, D, V, _ = CASES["odd"]
    check_against_oracle(CASES["bias_avg"], "torch", dtype, chunk_elements=5 * CASES["bias_avg"][2])
    check_against_oracle((R, T, D, V, {}), "torch", dtype, chunk_elements=2 * V)
