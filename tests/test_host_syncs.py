"""Host syncs on the trainer-facing path: with ``validate=False`` our code makes exactly one per call, the
``nonzero`` that compacts counted positions (its output size is data-dependent, so it cannot be avoided without
giving up compaction); the fused loss path adds one, the per-triplet row counts that size its chunks, unless the
caller passes them (``seq_counts``, known on the CPU when the batch is built). Counted positions
(``CountedPositions``) need no compaction: no ``nonzero``. ``validate=True`` adds exactly one: every value check
read back together.

Counted on the CPU by tests/_host_syncs.py (the operations that block the host on CUDA); on a GPU,
test_kernels_gpu.py checks the same with torch.cuda.set_sync_debug_mode.
"""

from collections import Counter

import pytest
import torch

from tests._hf_tiny import tiny_llama, triplet_batch
from tests._host_syncs import HostSyncCounter
from tests._oracle import make_inputs
from tests.test_counted_positions import make_positions
from tests.test_fused_loss import _counts_of
from tspin_kernels import spin_loss, tspin_loss, tspin_loss_from_logps
from tspin_kernels.integrations import CausalLMLogps, pack_padded, packed_position_ids
from tspin_kernels.kernels import fused_logps
from tspin_kernels.kernels import fused_loss as fused_loss_kernels

ONE_NONZERO = Counter(nonzero=1)
# the fused loss path (tspin_loss / spin_loss, fused=True) also reads its per-triplet row counts, to plan chunks
FUSED = ONE_NONZERO + Counter(tolist=1)
KERNELS = {fused_logps: ("_fwd_kernel", "_bwd_kernel", "_dlogits_kernel"),
           fused_loss_kernels: ("_row_lse_kernel", "_loss_dlogits_kernel")}


class _Paused:
    """A Triton kernel whose launches are not counted: on a GPU a launch is asynchronous; on the CPU Triton's
    interpreter runs it with numpy, which is not what the path costs on a device."""

    def __init__(self, kernel, counter):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with self.counter.paused():
                return launch(*args, **kwargs)

        return run


@pytest.fixture
def counter(monkeypatch):
    c = HostSyncCounter()
    for module, names in KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, _Paused(getattr(module, name), c))
    return c


def _step(counter, fn, *tensors):
    """Forward and backward of ``fn`` under ``counter``; its leaves are ``tensors``. Returns the syncs."""
    fn()  # warm-up: one-time work (the interpreter probe, Triton's compile) is not per call
    for t in tensors:
        t.grad = None
    counter.syncs.clear()
    with counter:
        loss = fn()
        loss.backward()
    assert all(t.grad is not None for t in tensors)
    return Counter(counter.syncs)


@pytest.mark.parametrize("impl,backward,fused", [("torch", None, False), ("torch", None, None),
                                                 ("triton", "atomic", None), ("triton", "matmul", None),
                                                 ("triton", None, True)])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_kernel_api_syncs_once_when_the_caller_vouches(counter, impl, layout, backward, fused):
    inp = make_inputs(6, 9, 16, 50, torch.float32, packed=layout == "packed", bias=True)
    h, w, b = (inp[k].requires_grad_() for k in ("hidden", "weight", "bias"))
    opts = dict(bias=b, cu_seqlens=inp.get("cu_seqlens"), shift=True, average=True, impl=impl, backward=backward,
                fused=fused)
    base = FUSED if fused or (fused is None and impl == "torch") else ONE_NONZERO

    def loss(**more):
        return lambda: tspin_loss(h, w, inp["labels"], **opts, **more).loss

    assert _step(counter, loss(validate=False), h, w, b) == base
    assert _step(counter, loss(validate=True), h, w, b) == base + Counter(tolist=1)
    assert _step(counter, loss(validate=True, check_finite=True), h, w, b) == base + Counter(tolist=1)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["padded", "packed", "positions"])
def test_seq_counts_take_the_fused_path_to_the_recompute_paths_syncs(counter, impl, layout):
    """With the caller's seq_counts the fused path reads nothing back: one nonzero for labels, nothing at all for
    counted positions, as on the recompute path; with validate=True it reads the counts to check them."""
    if layout == "positions":
        p = make_positions(12, 16, 50, 6, 30, hot=5)
        h, w, labels, kw = p["hidden"].float().requires_grad_(), p["weight"].float().requires_grad_(), \
            p["positions"], {}
        base = Counter()
    else:
        inp = make_inputs(6, 9, 16, 50, torch.float32, packed=layout == "packed")
        h, w, labels = inp["hidden"].requires_grad_(), inp["weight"].requires_grad_(), inp["labels"]
        kw = dict(cu_seqlens=inp.get("cu_seqlens"), shift=True)
        base = ONE_NONZERO
    counts = _counts_of(labels, kw.get("cu_seqlens"))

    def loss(fused, seq_counts=None, validate=False):
        return lambda: tspin_loss(h, w, labels, impl=impl, fused=fused, seq_counts=seq_counts, validate=validate,
                                  **kw).loss

    assert _step(counter, loss(False), h, w) == base
    assert _step(counter, loss(True), h, w) == base + Counter(tolist=1)
    assert _step(counter, loss(True, counts), h, w) == base
    assert _step(counter, loss(True, counts, validate=True), h, w) == base + Counter(tolist=2)


@pytest.mark.parametrize("fused", [False, True])
def test_spin_loss_reference_check_is_one_more_sync(counter, fused):
    inp = make_inputs(4, 9, 16, 50, torch.float32)
    h, w, ref = inp["hidden"].requires_grad_(), inp["weight"], torch.randn(4) - 20
    base = FUSED if fused else ONE_NONZERO

    def loss(validate):
        return lambda: spin_loss(h, w, inp["labels"], ref, impl="torch", validate=validate, fused=fused).loss

    assert _step(counter, loss(False), h) == base
    assert _step(counter, loss(True), h) == base + Counter(tolist=1, item=1)


def _backbone_syncs(counter, model, ids, **kw):
    """What transformers' backbone alone costs on the same batch (its mask preparation reads the device)."""
    def fn():
        return model.model(input_ids=ids, use_cache=False, **kw).last_hidden_state.sum()
    return _step(counter, fn, *model.model.parameters())


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_trainer_path_adds_one_sync_to_the_backbone(counter, layout):
    """CausalLMLogps(validate=False) -> T-SPIN loss -> backward, as the trainer runs a micro-batch after
    validating the batch on the CPU at collation: our code adds exactly the one nonzero to what the transformers
    backbone itself does."""
    model = tiny_llama(0)
    batch = triplet_batch(2)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    kw, backbone_kw = dict(attention_mask=mask), dict(attention_mask=mask)
    if layout == "packed":
        ids, labels, _, cu = pack_padded(ids, labels, mask)
        kw, backbone_kw = dict(cu_seqlens=cu), dict(position_ids=packed_position_ids(cu)[None])
    params = [p for p in model.parameters() if p.requires_grad]
    policy = CausalLMLogps(model, impl="torch", validate=False)

    def step(**call):
        def fn():
            real, generated, proto = policy(ids, labels, **kw, **call).chunk(3)
            return tspin_loss_from_logps(real, generated, proto, alpha=1.0, beta=0.1)
        return fn

    backbone = _backbone_syncs(counter, model, ids, **backbone_kw)
    assert _step(counter, step(), *params) - backbone == ONE_NONZERO
    assert _step(counter, step(), *params) - ONE_NONZERO == backbone  # nothing of ours hides in the difference
    checked = _step(counter, step(validate=True), *params)
    assert checked - backbone - ONE_NONZERO, "validate=True reads values back"


@pytest.mark.parametrize("snippet", [
    lambda t, m: t.sum().item(),
    lambda t, m: bool(t.sum() > 0),
    lambda t, m: int(t.argmax()),
    lambda t, m: t.tolist(),
    lambda t, m: t.cpu(),
    lambda t, m: m.nonzero(),
    lambda t, m: t[m],
    lambda t, m: t.masked_select(m),
    lambda t, m: torch.bincount(m.long()),
    lambda t, m: torch.repeat_interleave(torch.tensor([1, 2])),
    lambda t, m: torch.equal(t, t),
    lambda t, m: torch.unique(t),
], ids=["item", "bool", "int", "tolist", "cpu", "nonzero", "mask_index", "masked_select", "bincount",
        "repeat_interleave", "equal", "unique"])
def test_the_counter_sees_every_kind_of_sync(snippet):
    t, m = torch.randn(5), torch.tensor([True, False, True, True, False])
    with HostSyncCounter() as c:
        snippet(t, m)
    assert sum(c.syncs.values()) >= 1
    with HostSyncCounter() as c:
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        t[torch.tensor([0, 2])]
        (t * 2).exp().sum(0)
    assert not c.syncs
