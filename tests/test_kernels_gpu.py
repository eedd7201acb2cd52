"""The Triton kernels compiled for a real GPU (skipped without CUDA): same oracle checks, larger odd shapes."""

import pytest
import torch

from tests.test_fused_loss import check_fused
from tests.test_sequence_logps import check_against_oracle
from tspin_kernels import sequence_logps

pytestmark = pytest.mark.gpu

GPU_CASES = {
    "odd": (6, 257, 520, 5003, {}),
    "bias_shift": (6, 130, 256, 32001, dict(bias=True, shift=True)),
    "packed_avg": (9, 97, 384, 7777, dict(packed=True, shift=True, average=True)),
    "few_rows_wide_vocab": (3, 4, 128, 151936, {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_triton_on_gpu_against_float64(case, dtype):
    check_against_oracle(GPU_CASES[case], "triton", dtype, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_triton_on_gpu_frozen_head(dtype):
    check_against_oracle(GPU_CASES["odd"], "triton", dtype, weight_grad=False, device="cuda")


def test_int64_addressing():
    """hidden with more than 2**31 elements: only the last rows count, so the work is small but offsets are huge."""
    D, V = 4096, 1024
    N = (2**31) // D + 4096
    hidden = torch.zeros(N, D, dtype=torch.bfloat16, device="cuda")
    hidden[-64:] = torch.randn(64, D, dtype=torch.bfloat16, device="cuda")
    weight = (torch.randn(V, D, device="cuda") / D**0.5).bfloat16().requires_grad_()
    labels = torch.full((N,), -100, dtype=torch.long, device="cuda")
    labels[-64:] = torch.randint(0, V, (64,), device="cuda")
    cu = torch.tensor([0, N - 64, N], device="cuda")
    hidden.requires_grad_()
    out = sequence_logps(hidden, weight, labels, cu_seqlens=cu, impl="triton")
    out.sum().backward()
    h_tail = hidden.detach()[-64:].clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    ref = sequence_logps(h_tail[None], w2, labels[-64:][None], impl="reference")
    ref.sum().backward()
    assert out[0].item() == 0.0
    torch.testing.assert_close(out[1:], ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(hidden.grad[-64:].float(), h_tail.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weight.grad.float(), w2.grad.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ["odd", "bias_shift", "packed_avg"])
def test_matmul_backward_on_gpu_against_float64(case, dtype):
    check_against_oracle(GPU_CASES[case], "triton", dtype, device="cuda", backward="matmul")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("chunk", [None, 7 * 5003], ids=["default_chunk", "7_row_chunks"])
def test_torch_recompute_path_on_gpu_against_float64(chunk, dtype):
    """The torch recompute path on CUDA: its 16-bit weight-gradient product on tensor cores (float32 result), in
    one chunk (the 1 GiB default) and in many."""
    check_against_oracle(GPU_CASES["bias_shift"], "torch", dtype, device="cuda", chunk_elements=chunk)
    check_against_oracle(GPU_CASES["odd"], "torch", dtype, device="cuda", chunk_elements=chunk)


@pytest.mark.parametrize("strategy", ["atomic", "matmul"])
def test_backward_memory_is_the_gradients_plus_a_bounded_scratch(strategy):
    """A bf16 llama3-sized head: the backward's peak over the inputs is the gradients themselves plus bounded
    scratch (float32 weight-gradient slice, dlogits block, float32 products), never a float32 copy of the whole
    head (2 GiB here) or [tokens x V] logits."""
    from tspin_kernels.kernels import fused_logps

    D, V, R, T = 4096, 128256, 6, 512
    hidden = torch.randn(R, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, D, device="cuda") / D**0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (R, T), device="cuda")
    out = sequence_logps(hidden, weight, labels, impl="triton", backward=strategy)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out.sum().backward()
    torch.cuda.synchronize()
    rise = torch.cuda.max_memory_allocated() - base
    grads = weight.numel() * 2 + hidden.numel() * 2
    scratch = fused_logps.GW_SCRATCH_ELEMENTS * 4 + R * T * D * 4  # weight slice + grad_hidden, float32
    if strategy == "matmul":  # + the dlogits block, the slice's float32 product and the gathered rows
        scratch += fused_logps.DL_BLOCK_ELEMENTS * 2 + fused_logps.GW_SCRATCH_ELEMENTS * 4 + R * T * D * 6
    assert rise <= grads + scratch + 64 * 2**20, f"backward peak rise {rise / 2**20:.0f} MiB"
    assert torch.isfinite(weight.grad.float()).all() and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("path", ["atomic", "matmul", "default"])
@pytest.mark.parametrize("packed", [False, True])
def test_one_host_sync_per_call_when_the_caller_vouches(path, packed):
    """CUDA's own sync detector over forward + backward of tspin_loss with validate=False: exactly one
    synchronizing operation per call (the nonzero that compacts counted positions); validate=True adds one
    readback. ``atomic`` / ``matmul``: the recompute path's two Triton backwards; ``default``: the plain call (on
    CUDA the fused path), given the rows' counts as a trainer knows them (``seq_counts``), as tspin's trainer does.

    The count is taken on the third call. One-time work of a process's first calls is not per call: the H200 run
    at ec8b2c3 counted a second sync only in the first of these cases to run (the atomic backward, padded), while
    the same atomic backward counted one in the packed case that ran two tests later, and the atomic backward reads
    nothing back (tspin_kernels/kernels/fused_logps.py: launches, float32 buffers, an index_copy; the CPU counter
    in tests/test_host_syncs.py finds no sync there either). Every sync of a failing count is named below with
    the line that made it, so a per-call sync on the device says where it is."""
    import warnings

    from tests._oracle import make_inputs
    from tests.test_fused_loss import _counts_of
    from tspin_kernels import tspin_loss

    inp = make_inputs(6, 33, 64, 1000, torch.bfloat16, packed=packed, bias=True)
    t = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    h, w, b = (t[k].requires_grad_() for k in ("hidden", "weight", "bias"))
    opts = dict(bias=b, cu_seqlens=t.get("cu_seqlens"), shift=True, average=True)
    if path == "default":
        opts["seq_counts"] = _counts_of(inp["labels"], inp.get("cu_seqlens"))
    else:
        opts.update(impl="triton", backward=path)

    def syncs(**more) -> list[str]:
        for _ in range(2):  # warm-up: compiles, first launches, allocator growth
            tspin_loss(h, w, t["labels"], **opts, **more).loss.backward()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tspin_loss(h, w, t["labels"], **opts, **more).loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [f"{c.filename}:{c.lineno}" for c in caught if "synchronizing" in str(c.message)]

    found = syncs(validate=False)
    assert len(found) == 1, found
    found = syncs(validate=True)
    assert len(found) == 2 + (path == "default"), found  # the fused path checks the given counts too


# the fused loss path on CUDA: cuBLAS products + the Triton epilogues (rows divisible by 6: triplets and pairs)
FUSED_GPU_CASES = {
    "odd": (6, 257, 520, 5003, {}, {}),
    "bias_shift": (6, 130, 256, 32001, dict(bias=True), dict(shift=True)),
    "packed_avg": (12, 97, 384, 7777, dict(packed=True), dict(shift=True, average=True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("loss", ["tspin", "spin"])
@pytest.mark.parametrize("case", list(FUSED_GPU_CASES))
def test_fused_loss_on_gpu_against_float64(case, loss, dtype):
    check_fused(FUSED_GPU_CASES[case], loss, "triton", dtype, device="cuda")
    check_fused(FUSED_GPU_CASES[case], loss, "torch", dtype, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_fused_loss_on_gpu_chunks_and_frozen_head(dtype):
    case = FUSED_GPU_CASES["odd"]
    for cap in (300 * 5003, 40 * 5003):  # one triplet per chunk; triplets in two-pass row sub-chunks
        check_fused(case, "tspin", "triton", dtype, device="cuda", chunk_elements=cap)
    check_fused(case, "tspin", "triton", dtype, weight_grad=False, device="cuda")
