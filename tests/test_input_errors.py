"""Every bad input of SPEC section 2 raises a clear error naming the argument (one test per case)."""

import pytest
import torch

from tspin_kernels import sequence_logps, spin_loss, tspin_loss

R, T, D, V = 6, 5, 8, 20


def _ok():
    return torch.randn(R, T, D), torch.randn(V, D), torch.randint(0, V, (R, T))


@pytest.fixture(params=["reference", "torch", "triton"])
def impl(request):
    return request.param


def test_labels_shape_mismatch(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match=r"labels: expected shape \(6, 5\)"):
        sequence_logps(h, w, lab[:, :-1], impl=impl)


def test_hidden_dim_mismatch(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match="hidden: last dimension must equal weight's D=8"):
        sequence_logps(h[..., :-1], w, lab, impl=impl)


def test_hidden_wrong_rank(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match=r"hidden: expected \(R, T, D\)"):
        sequence_logps(h[0], w, lab[0], impl=impl)


def test_weight_wrong_rank(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match=r"weight: expected shape \(V, D\)"):
        sequence_logps(h, w[None], lab, impl=impl)


def test_label_above_vocab(impl):
    h, w, lab = _ok()
    lab[1, 2] = V
    with pytest.raises(ValueError, match=r"labels: values must be in \[0, 20\).*found 20"):
        sequence_logps(h, w, lab, impl=impl)


def test_negative_label_other_than_ignore_index(impl):
    h, w, lab = _ok()
    lab[0, 0] = -1
    with pytest.raises(ValueError, match="labels: values must be in .*found -1"):
        sequence_logps(h, w, lab, impl=impl)


def test_float_labels(impl):
    h, w, lab = _ok()
    with pytest.raises(TypeError, match="labels: expected an integer dtype"):
        sequence_logps(h, w, lab.float(), impl=impl)


def test_dtype_mismatch(impl):
    h, w, lab = _ok()
    with pytest.raises(TypeError, match="weight: expected the same dtype as hidden"):
        sequence_logps(h.bfloat16(), w, lab, impl=impl)


def test_unsupported_dtype(impl):
    h, w, lab = _ok()
    with pytest.raises(TypeError, match="hidden: expected dtype bfloat16, float16 or float32"):
        sequence_logps(h.int(), w.int(), lab, impl=impl)


def test_float64_is_for_the_torch_paths_only():
    h, w, lab = _ok()
    with pytest.raises(TypeError, match="hidden: impl='triton' expects bfloat16, float16 or float32"):
        sequence_logps(h.double(), w.double(), lab, impl="triton")


def test_not_a_tensor(impl):
    _, w, lab = _ok()
    with pytest.raises(TypeError, match="hidden: expected a torch.Tensor"):
        sequence_logps([[0.0]], w, lab, impl=impl)


def test_bias_shape(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match=r"bias: expected shape \(20,\)"):
        sequence_logps(h, w, lab, bias=torch.zeros(V + 1), impl=impl)


def test_ignore_index_inside_vocab(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match="ignore_index: must lie outside the vocabulary"):
        sequence_logps(h, w, lab, ignore_index=3, impl=impl)


def test_tspin_rows_not_divisible_by_3(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match="tspin_loss needs 3B rows.*got 4"):
        tspin_loss(h[:4], w, lab[:4], impl=impl)


def test_spin_rows_not_divisible_by_2(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match="spin_loss needs 2B rows.*got 5"):
        spin_loss(h[:5], w, lab[:5], torch.zeros(5), impl=impl)


def test_spin_ref_logps_shape(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match=r"ref_logps: expected a tensor of shape \(6,\)"):
        spin_loss(h, w, lab, torch.zeros(4), impl=impl)


def test_cu_seqlens_not_increasing(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match="cu_seqlens: must be non-decreasing"):
        sequence_logps(h.reshape(-1, D), w, lab.reshape(-1), cu_seqlens=torch.tensor([0, 20, 10, 30]), impl=impl)


def test_cu_seqlens_wrong_end(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match="cu_seqlens: must end at the packed length N=30"):
        sequence_logps(h.reshape(-1, D), w, lab.reshape(-1), cu_seqlens=torch.tensor([0, 10, 29]), impl=impl)


def test_cu_seqlens_wrong_start(impl):
    h, w, lab = _ok()
    with pytest.raises(ValueError, match="cu_seqlens: must start at 0"):
        sequence_logps(h.reshape(-1, D), w, lab.reshape(-1), cu_seqlens=torch.tensor([1, 10, 30]), impl=impl)


def test_non_finite_hidden_opt_in(impl):
    h, w, lab = _ok()
    h[2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="hidden: contains NaN or Inf"):
        sequence_logps(h, w, lab, impl=impl, check_finite=True)


def test_unknown_impl():
    h, w, lab = _ok()
    with pytest.raises(ValueError, match="impl: expected one of"):
        sequence_logps(h, w, lab, impl="cuda")


def test_triton_without_gpu_or_interpreter(monkeypatch):
    h, w, lab = _ok()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        sequence_logps(h, w, lab, impl="triton")


def test_interpreter_probe_passes_here():
    from tspin_kernels.kernels.interpreter_probe import interpreter_error

    assert interpreter_error() is None  # this suite's Triton/numpy pair interprets a scalar-bounded loop


def test_broken_interpreter_is_one_clear_error(monkeypatch):
    """Triton 3.6 with numpy >= 2.4 cannot interpret any loop; say so before our kernels fail deep inside."""
    from tspin_kernels.kernels import interpreter_probe

    monkeypatch.setattr(interpreter_probe, "interpreter_error", lambda: "InterpreterError: TypeError('0-d')")
    h, w, lab = _ok()
    with pytest.raises(RuntimeError, match=r"CPU interpreter \(TRITON_INTERPRET=1\) cannot run kernels with numpy"):
        sequence_logps(h, w, lab, impl="triton")
    assert torch.isfinite(sequence_logps(h, w, lab, impl="torch")).all()  # the suggested fallback works


def test_non_finite_alpha():
    h, w, lab = _ok()
    with pytest.raises(ValueError, match="alpha: expected a finite number"):
        tspin_loss(h, w, lab, alpha=float("inf"))
