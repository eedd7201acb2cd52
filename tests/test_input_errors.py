"""The kernel API's bad-input matrix: every bad input raises a ValueError/TypeError whose message names the
argument (one test per case and implementation), and the inputs that used to give a silent result (NaN alpha or
reference log-probs, shapes that broadcast, fp16 logits beyond the fp16 range, double backward) give a clear error
or a finite, correct result.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from tests._oracle import make_inputs
from tspin_kernels import (
    SequenceLogps,
    SPINLoss,
    TSPINLoss,
    sequence_logps,
    spin_loss,
    spin_loss_from_logps,
    tspin_loss,
    tspin_loss_from_logps,
)

R, T, D, V = 6, 5, 8, 20
NAN, INF = float("nan"), float("inf")
IMPLS = ["torch", "triton"]


def _ok():
    """Valid inputs: padded (h, w, lab), packed (hp, labp, cu), optional bias b, reference log-probs ref."""
    h, w, lab = torch.randn(R, T, D), torch.randn(V, D), torch.randint(0, V, (R, T))
    return SimpleNamespace(h=h, w=w, lab=lab, b=torch.zeros(V), hp=h.reshape(R * T, D), labp=lab.reshape(-1),
                           cu=torch.tensor([0, 5, 12, 18, 20, 27, 30]), ref=torch.randn(R) - 20)


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def seq(**kw):
    """sequence_logps on the padded inputs with options ``kw``."""
    return lambda x, impl: sequence_logps(x.h, x.w, x.lab, impl=impl, **kw)


def packed(x, impl, cu):
    return sequence_logps(x.hp, x.w, x.labp, cu_seqlens=cu, impl=impl)


META = torch.device("meta")  # a second device that exists on every machine: device checks without a GPU

# (id, call(x, impl), exception, message pattern naming the argument)
CASES = [
    # hidden
    ("hidden_list", lambda x, i: sequence_logps([[0.0]], x.w, x.lab, impl=i), TypeError, "hidden: expected a torch"),
    ("hidden_int", lambda x, i: sequence_logps(x.h.int(), x.w.int(), x.lab, impl=i), TypeError,
     "hidden: expected dtype"),
    ("hidden_complex", lambda x, i: sequence_logps(x.h.cfloat(), x.w.cfloat(), x.lab, impl=i), TypeError,
     "hidden: expected dtype"),
    ("hidden_2d_unpacked", lambda x, i: sequence_logps(x.h[0], x.w, x.lab[0], impl=i), ValueError,
     r"hidden: expected \(R, T, D\)"),
    ("hidden_4d", lambda x, i: sequence_logps(x.h[None], x.w, x.lab[None], impl=i), ValueError,
     r"hidden: expected \(R, T, D\)"),
    ("hidden_wrong_D", lambda x, i: sequence_logps(x.h[..., :-1], x.w, x.lab, impl=i), ValueError,
     "hidden: last dimension must equal weight's D=8"),
    ("hidden_3d_with_cu", lambda x, i: sequence_logps(x.h, x.w, x.lab, cu_seqlens=x.cu, impl=i), ValueError,
     "hidden: with cu_seqlens expected packed"),
    ("hidden_nan_check_finite", lambda x, i: sequence_logps(_set(x.h, (2, 3, 1), NAN), x.w, x.lab, impl=i,
                                                            check_finite=True), ValueError, "hidden: contains NaN"),
    ("hidden_inf_check_finite", lambda x, i: sequence_logps(_set(x.h, (0, 0, 0), -INF), x.w, x.lab, impl=i,
                                                            check_finite=True), ValueError, "hidden: contains NaN"),
    ("hidden_nan_check_finite_unvalidated", lambda x, i: sequence_logps(
        _set(x.h, (1, 1, 1), NAN), x.w, x.lab, impl=i, check_finite=True, validate=False), ValueError,
     "hidden: contains NaN"),
    # weight
    ("weight_ndarray", lambda x, i: sequence_logps(x.h, x.w.numpy(), x.lab, impl=i), TypeError,
     "weight: expected a torch"),
    ("weight_dtype", lambda x, i: sequence_logps(x.h.bfloat16(), x.w, x.lab, impl=i), TypeError,
     "weight: expected the same dtype as hidden"),
    ("weight_1d", lambda x, i: sequence_logps(x.h, x.w[0], x.lab, impl=i), ValueError,
     r"weight: expected shape \(V, D\)"),
    ("weight_3d", lambda x, i: sequence_logps(x.h, x.w[None], x.lab, impl=i), ValueError, r"weight: expected shape"),
    ("weight_empty_vocab", lambda x, i: sequence_logps(x.h, x.w[:0], x.lab, impl=i), ValueError,
     r"weight: expected non-empty"),
    ("weight_other_device", lambda x, i: sequence_logps(x.h, x.w.to(META), x.lab, impl=i), ValueError,
     "weight: expected to be on cpu"),
    # labels
    ("labels_list", lambda x, i: sequence_logps(x.h, x.w, x.lab.tolist(), impl=i), TypeError,
     "labels: expected a torch"),
    ("labels_float", lambda x, i: sequence_logps(x.h, x.w, x.lab.float(), impl=i), TypeError,
     "labels: expected an integer dtype"),
    ("labels_bool", lambda x, i: sequence_logps(x.h, x.w, x.lab > 3, impl=i), TypeError, "labels: expected an integer"),
    ("labels_short", lambda x, i: sequence_logps(x.h, x.w, x.lab[:, :-1], impl=i), ValueError,
     r"labels: expected shape \(6, 5\)"),
    ("labels_extra_dim", lambda x, i: sequence_logps(x.h, x.w, x.lab[..., None], impl=i), ValueError,
     r"labels: expected shape \(6, 5\)"),
    ("labels_transposed", lambda x, i: sequence_logps(x.h, x.w, x.lab.T, impl=i), ValueError, "labels: expected shape"),
    ("label_equals_vocab", lambda x, i: sequence_logps(x.h, x.w, _set(x.lab, (1, 2), V), impl=i), ValueError,
     r"labels: values must be in \[0, 20\).*found 20"),
    ("label_negative", lambda x, i: sequence_logps(x.h, x.w, _set(x.lab, (0, 0), -1), impl=i), ValueError,
     "labels: values must be in .*found -1"),
    ("label_packed_above_vocab", lambda x, i: sequence_logps(x.hp, x.w, _set(x.labp, 7, 99), cu_seqlens=x.cu,
                                                             impl=i), ValueError, "labels: .*found 99"),
    ("label_int32_above_vocab", lambda x, i: sequence_logps(x.h, x.w, _set(x.lab, (5, 4), 21).int(), impl=i),
     ValueError, "labels: .*found 21"),
    ("labels_other_device", lambda x, i: sequence_logps(x.h, x.w, x.lab.to(META), impl=i), ValueError,
     "labels: expected to be on cpu"),
    # bias
    ("bias_list", seq(bias=[0.0] * V), TypeError, "bias: expected a torch.Tensor or None"),
    ("bias_long", lambda x, i: sequence_logps(x.h, x.w, x.lab, bias=torch.zeros(V + 1), impl=i), ValueError,
     r"bias: expected shape \(20,\)"),
    ("bias_2d", lambda x, i: sequence_logps(x.h, x.w, x.lab, bias=x.b[None], impl=i), ValueError,
     r"bias: expected shape \(20,\)"),
    ("bias_dtype", lambda x, i: sequence_logps(x.h, x.w, x.lab, bias=x.b.double(), impl=i), TypeError,
     "bias: expected the same dtype"),
    ("bias_other_device", lambda x, i: sequence_logps(x.h, x.w, x.lab, bias=x.b.to(META), impl=i), ValueError,
     "bias: expected to be on cpu"),
    # ignore_index
    ("ignore_index_float", seq(ignore_index=-100.0), TypeError, "ignore_index: expected an int"),
    ("ignore_index_bool", seq(ignore_index=False), TypeError, "ignore_index: expected an int"),
    ("ignore_index_tensor", seq(ignore_index=torch.tensor(-100)), TypeError, "ignore_index: expected an int"),
    ("ignore_index_in_vocab", seq(ignore_index=3), ValueError, "ignore_index: must lie outside the vocabulary"),
    ("ignore_index_zero", seq(ignore_index=0), ValueError, "ignore_index: must lie outside"),
    # cu_seqlens
    ("cu_list", lambda x, i: packed(x, i, x.cu.tolist()), TypeError, "cu_seqlens: expected an integer torch"),
    ("cu_float", lambda x, i: packed(x, i, x.cu.float()), ValueError, "cu_seqlens: expected an integer tensor"),
    ("cu_bool", lambda x, i: packed(x, i, x.cu > 0), ValueError, "cu_seqlens: expected an integer tensor"),
    ("cu_2d", lambda x, i: packed(x, i, x.cu[None]), ValueError, r"cu_seqlens: expected .* shape \(S\+1,\)"),
    ("cu_one_offset", lambda x, i: packed(x, i, x.cu[:1]), ValueError, r"cu_seqlens: expected .*S>=1"),
    ("cu_not_from_zero", lambda x, i: packed(x, i, _set(x.cu, 0, 1)), ValueError, "cu_seqlens: must start at 0"),
    ("cu_decreasing", lambda x, i: packed(x, i, torch.tensor([0, 20, 10, 30])), ValueError,
     "cu_seqlens: must be non-decreasing"),
    ("cu_short_end", lambda x, i: packed(x, i, torch.tensor([0, 10, 29])), ValueError,
     "cu_seqlens: must end at the packed length N=30"),
    ("cu_long_end", lambda x, i: packed(x, i, torch.tensor([0, 10, 31])), ValueError,
     "cu_seqlens: must end at the packed length N=30"),
    ("cu_other_device", lambda x, i: packed(x, i, x.cu.to(META)), ValueError, "cu_seqlens: expected to be on cpu"),
    # flags
    ("shift_str", seq(shift="yes"), TypeError, "shift: expected True or False"),
    ("average_int", seq(average=1), TypeError, "average: expected True or False"),
    ("validate_none", seq(validate=None), TypeError, "validate: expected True or False"),
    ("check_finite_str", seq(check_finite="no"), TypeError, "check_finite: expected True or False"),
    # impl and the kernel options
    ("backward_unknown", seq(backward="fast"), ValueError, "backward: expected one of"),
    ("backward_int", seq(backward=1), TypeError, "backward: expected one of"),
    ("grad_filter_negative", seq(grad_filter_eps=-0.1), ValueError, r"grad_filter_eps: expected a float in \[0, 1\)"),
    ("grad_filter_one", seq(grad_filter_eps=1.0), ValueError, "grad_filter_eps: expected a float"),
    ("grad_filter_nan", seq(grad_filter_eps=NAN), ValueError, "grad_filter_eps: expected a float"),
    ("grad_filter_str", seq(grad_filter_eps="1e-3"), TypeError, "grad_filter_eps: expected a float"),
    ("grad_filter_with_matmul", seq(grad_filter_eps=1e-4, backward="matmul"), ValueError,
     "grad_filter_eps: skips tiles of the atomic backward only"),
    ("tiles_str", seq(tiles="64,128,64,8,3"), TypeError, "tiles: expected None or a dict"),
    ("tiles_unknown_kernel", seq(tiles={"fw": "64,128,64,8,3"}), ValueError, "tiles: keys must be among"),
    ("tiles_not_power_of_two", seq(tiles={"fwd": "64,100,64,8,3"}), ValueError, r"tiles\['fwd'\] must be"),
    ("tiles_four_numbers", seq(tiles={"bwd": (64, 128, 64, 8)}), ValueError, r"tiles\['bwd'\] must be"),
    ("tiles_int", seq(tiles={"fwd": 64}), TypeError, r"tiles\['fwd'\]: expected"),
    ("tiles_partial_dict", seq(tiles={"fwd": {"BLOCK_M": 64}}), ValueError, r"tiles\['fwd'\] must be"),
    ("tiles_stages_zero", seq(tiles={"bwd": "64,128,64,8,0"}), ValueError, r"tiles\['bwd'\] must be"),
    ("chunk_zero", seq(chunk_elements=0), ValueError, "chunk_elements: expected a positive int"),
    ("chunk_negative", seq(chunk_elements=-5), ValueError, "chunk_elements: expected a positive int"),
    ("chunk_float", seq(chunk_elements=1.5), TypeError, "chunk_elements: expected a positive int"),
    ("chunk_str", seq(chunk_elements="32MiB"), TypeError, "chunk_elements: expected a positive int"),
    ("chunk_bool", seq(chunk_elements=True), TypeError, "chunk_elements: expected a positive int"),
    ("unknown_option", seq(bakward="matmul"), TypeError, "bakward"),
    # tspin_loss
    ("tspin_rows_not_3b", lambda x, i: tspin_loss(x.h[:4], x.w, x.lab[:4], impl=i), ValueError,
     "tspin_loss needs 3B rows.*got 4"),
    ("tspin_packed_rows_not_3b", lambda x, i: tspin_loss(x.hp, x.w, x.labp, cu_seqlens=x.cu[:5].clone(), impl=i),
     ValueError, "tspin_loss needs 3B rows.*got 4"),
    ("tspin_cu_list", lambda x, i: tspin_loss(x.hp, x.w, x.labp, cu_seqlens=x.cu.tolist(), impl=i), TypeError,
     "cu_seqlens: expected an integer torch.Tensor"),
    ("tspin_alpha_nan", lambda x, i: tspin_loss(x.h, x.w, x.lab, alpha=NAN, impl=i), ValueError,
     "alpha: expected a finite number"),
    ("tspin_alpha_inf", lambda x, i: tspin_loss(x.h, x.w, x.lab, alpha=INF, impl=i), ValueError, "alpha: expected"),
    ("tspin_beta_nan", lambda x, i: tspin_loss(x.h, x.w, x.lab, beta=NAN, impl=i), ValueError, "beta: expected"),
    ("tspin_beta_neg_inf", lambda x, i: tspin_loss(x.h, x.w, x.lab, beta=-INF, impl=i), ValueError, "beta: expected"),
    ("tspin_alpha_str", lambda x, i: tspin_loss(x.h, x.w, x.lab, alpha="1", impl=i), TypeError, "alpha: expected"),
    ("tspin_alpha_none", lambda x, i: tspin_loss(x.h, x.w, x.lab, alpha=None, impl=i), TypeError, "alpha: expected"),
    ("tspin_beta_bool", lambda x, i: tspin_loss(x.h, x.w, x.lab, beta=True, impl=i), TypeError, "beta: expected"),
    ("tspin_bad_labels", lambda x, i: tspin_loss(x.h, x.w, x.lab.float(), impl=i), TypeError, "labels: expected"),
    # spin_loss
    ("spin_rows_odd", lambda x, i: spin_loss(x.h[:5], x.w, x.lab[:5], x.ref[:5], impl=i), ValueError,
     "spin_loss needs 2B rows.*got 5"),
    ("spin_ref_short", lambda x, i: spin_loss(x.h, x.w, x.lab, x.ref[:4], impl=i), ValueError,
     r"ref_logps: expected a tensor of shape \(6,\)"),
    ("spin_ref_column", lambda x, i: spin_loss(x.h, x.w, x.lab, x.ref[:, None], impl=i), ValueError,
     r"ref_logps: expected a tensor of shape \(6,\)"),
    ("spin_ref_list", lambda x, i: spin_loss(x.h, x.w, x.lab, x.ref.tolist(), impl=i), ValueError,
     "ref_logps: expected a tensor"),
    ("spin_ref_int", lambda x, i: spin_loss(x.h, x.w, x.lab, x.ref.long(), impl=i), TypeError,
     "ref_logps: expected a floating dtype"),
    ("spin_ref_nan", lambda x, i: spin_loss(x.h, x.w, x.lab, _set(x.ref, 3, NAN), impl=i), ValueError,
     "ref_logps: contains NaN or Inf"),
    ("spin_ref_inf", lambda x, i: spin_loss(x.h, x.w, x.lab, _set(x.ref, 0, -INF), impl=i), ValueError,
     "ref_logps: contains NaN or Inf"),
    ("spin_beta_nan", lambda x, i: spin_loss(x.h, x.w, x.lab, x.ref, beta=NAN, impl=i), ValueError, "beta: expected"),
    ("spin_cu_list", lambda x, i: spin_loss(x.hp, x.w, x.labp, x.ref, cu_seqlens=x.cu.tolist(), impl=i), TypeError,
     "cu_seqlens: expected an integer torch.Tensor"),
    ("spin_validate_str", lambda x, i: spin_loss(x.h, x.w, x.lab, x.ref, validate="no", impl=i), TypeError,
     "validate: expected True or False"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(case, impl):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call(_ok(), impl)


def _logps(n=3):
    return [torch.randn(n) - 10 for _ in range(4)]


# the loss helpers on log-probs you already have, and the module constructors: no impl involved
HELPER_CASES = [
    ("impl_unknown", lambda: seq()(_ok(), "cuda"), ValueError, "impl: expected one of"),
    ("impl_none", lambda: seq()(_ok(), None), TypeError, "impl: expected one of"),
    ("impl_capitalised", lambda: seq()(_ok(), "Triton"), ValueError, "impl: expected one of"),
    ("tspin_real_list", lambda: tspin_loss_from_logps([1.0], *_logps(1)[:2]), TypeError, "real: expected a 1-D"),
    ("tspin_lengths_differ", lambda: tspin_loss_from_logps(torch.zeros(3), torch.zeros(4), torch.zeros(3)),
     ValueError, r"generated: expected shape \(3,\) like real"),
    ("tspin_broadcastable_proto", lambda: tspin_loss_from_logps(torch.zeros(3), torch.zeros(3), torch.zeros(1)),
     ValueError, r"proto: expected shape \(3,\)"),
    ("tspin_column", lambda: tspin_loss_from_logps(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1)),
     ValueError, "real: expected a 1-D tensor"),
    ("tspin_scalar", lambda: tspin_loss_from_logps(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)),
     ValueError, "real: expected a 1-D tensor"),
    ("tspin_int_logps", lambda: tspin_loss_from_logps(torch.zeros(3), torch.zeros(3, dtype=torch.long),
                                                      torch.zeros(3)), TypeError, "generated: expected a floating"),
    ("tspin_empty", lambda: tspin_loss_from_logps(torch.zeros(0), torch.zeros(0), torch.zeros(0)), ValueError,
     "real: expected at least one sequence"),
    ("tspin_other_device", lambda: tspin_loss_from_logps(torch.zeros(3), torch.zeros(3), torch.zeros(3, device=META)),
     ValueError, "proto: expected to be on cpu"),
    ("tspin_helper_alpha_nan", lambda: tspin_loss_from_logps(*_logps()[:3], alpha=NAN), ValueError, "alpha: expected"),
    ("tspin_helper_beta_inf", lambda: tspin_loss_from_logps(*_logps()[:3], beta=INF), ValueError, "beta: expected"),
    ("tspin_helper_alpha_tensor", lambda: tspin_loss_from_logps(*_logps()[:3], alpha=torch.tensor(1.0)), TypeError,
     "alpha: expected a finite number"),
    ("spin_ref_real_short", lambda: spin_loss_from_logps(*_logps()[:2], torch.zeros(2), torch.zeros(3)), ValueError,
     r"ref_real: expected shape \(3,\) like real"),
    ("spin_ref_generated_int", lambda: spin_loss_from_logps(*_logps()[:3], torch.zeros(3, dtype=torch.int32)),
     TypeError, "ref_generated: expected a floating dtype"),
    ("spin_helper_beta_nan", lambda: spin_loss_from_logps(*_logps(), beta=NAN), ValueError, "beta: expected"),
    ("spin_generated_none", lambda: spin_loss_from_logps(torch.zeros(3), None, *_logps()[:2]), TypeError,
     "generated: expected a 1-D"),
    ("module_alpha_nan", lambda: TSPINLoss(alpha=NAN), ValueError, "alpha: expected a finite number"),
    ("module_beta_str", lambda: SPINLoss(beta="0.1"), TypeError, "beta: expected a finite number"),
    ("module_impl", lambda: SequenceLogps(impl="gpu"), ValueError, "impl: expected one of"),
    ("module_backward", lambda: TSPINLoss(backward="atomics"), ValueError, "backward: expected one of"),
    ("module_tiles", lambda: SequenceLogps(tiles={"fwd": "1,2"}), ValueError, r"tiles\['fwd'\] must be"),
    ("module_chunk", lambda: SPINLoss(chunk_elements=0), ValueError, "chunk_elements: expected a positive int"),
    ("module_shift", lambda: SequenceLogps(shift="true"), TypeError, "shift: expected True or False"),
    ("module_validate", lambda: TSPINLoss(validate=1), TypeError, "validate: expected True or False"),
]


@pytest.mark.parametrize("case", HELPER_CASES, ids=[c[0] for c in HELPER_CASES])
def test_bad_helper_or_module_input_names_the_argument(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------- silent results
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_large_16bit_logits_stay_finite_and_correct(impl, dtype):
    """Logits up to ~1.5e5, beyond fp16's 65504: both paths compute them in float32 and agree with float64 (the
    naive fp16 path, logits in fp16 as HF computes them, overflows to NaN here)."""
    inp = make_inputs(3, 7, 16, 50, torch.float32)
    h = (inp["hidden"] * 40).to(dtype)
    w = (inp["weight"] * 400).to(dtype)
    lab = inp["labels"]
    big = (h.double() @ w.double().T).abs().max().item()
    assert big > 65504
    outs, grads = {}, {}
    for which, hh, ww in (("float64", h.double(), w.double()), (impl, h, w)):
        hh, ww = hh.clone().requires_grad_(), ww.clone().requires_grad_()
        outs[which] = sequence_logps(hh, ww, lab, impl="reference" if which == "float64" else which)
        (outs[which] * torch.linspace(-1, 2, 3, dtype=outs[which].dtype)).sum().backward()
        grads[which] = (hh.grad.double(), ww.grad.double())
    assert torch.isfinite(outs[impl]).all()
    scale = outs["float64"].abs().max().item()
    torch.testing.assert_close(outs[impl].double(), outs["float64"], rtol=0, atol=1e-3 * scale)
    for g, ref in zip(grads[impl], grads["float64"]):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def test_nan_settings_and_references_never_reach_the_loss():
    real, gen, proto, _ = _logps()
    for alpha in (NAN, INF, -INF):
        with pytest.raises(ValueError, match="alpha"):
            tspin_loss_from_logps(real, gen, proto, alpha=alpha)
    x = _ok()
    for impl in IMPLS:
        with pytest.raises(ValueError, match="ref_logps"):
            spin_loss(x.h, x.w, x.lab, _set(x.ref, 1, NAN), impl=impl)
    # the caller vouched (validate=False): the check is skipped, and the loss says so by being NaN, not finite
    out = spin_loss(x.h, x.w, x.lab, _set(x.ref, 1, NAN), impl="torch", validate=False)
    assert math.isnan(out.loss.item())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("how", ["sum", "tspin"])
def test_double_backward_is_refused_clearly(impl, how):
    x = _ok()
    h = x.h.clone().requires_grad_()
    w = x.w.clone().requires_grad_()
    loss = (sequence_logps(h, w, x.lab, impl=impl).sum() if how == "sum"
            else tspin_loss(h, w, x.lab, impl=impl).loss)
    with pytest.raises(RuntimeError, match="double backward is not supported.*create_graph=True"):
        torch.autograd.grad(loss, (h, w), create_graph=True)
    g = torch.autograd.grad(tspin_loss(h, w, x.lab, impl=impl).loss, (h, w))  # first order works
    assert all(torch.isfinite(t).all() for t in g)


# ---------------------------------------------------------------------------------------------- environment
def test_float64_is_for_the_torch_paths_only():
    x = _ok()
    with pytest.raises(TypeError, match="hidden: impl='triton' expects bfloat16, float16 or float32"):
        sequence_logps(x.h.double(), x.w.double(), x.lab, impl="triton")


def test_triton_without_gpu_or_interpreter(monkeypatch):
    x = _ok()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        sequence_logps(x.h, x.w, x.lab, impl="triton")


def test_interpreter_probe_passes_here():
    from tspin_kernels.kernels.interpreter_probe import interpreter_error

    assert interpreter_error() is None  # this suite's Triton/numpy pair interprets a scalar-bounded loop


def test_broken_interpreter_is_one_clear_error(monkeypatch):
    """Triton 3.6 with numpy >= 2.4 cannot interpret any loop; say so before our kernels fail deep inside."""
    from tspin_kernels.kernels import interpreter_probe

    monkeypatch.setattr(interpreter_probe, "interpreter_error", lambda: "InterpreterError: TypeError('0-d')")
    x = _ok()
    with pytest.raises(RuntimeError, match=r"CPU interpreter \(TRITON_INTERPRET=1\) cannot run kernels with numpy"):
        sequence_logps(x.h, x.w, x.lab, impl="triton")
    assert torch.isfinite(sequence_logps(x.h, x.w, x.lab, impl="torch")).all()  # the suggested fallback works
