"""The per-kernel profile of the loss paths (benchmarks/profile_fused.py) on the CPU at the tiny shape: the JSON it
writes (provenance, every path, a kernel table whose shares add up), the order of its writes (a cut run keeps the
paths that finished), its argument errors, the pieces that read the profiler's events, and the GPU suite's
``profile`` part bringing back the JSON and the Markdown."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from benchmarks import profile_fused as pf

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--shape", "tiny-cpu", "--paths", "fused,default", "--warmup", "1", "--reps", "1", "--profile-steps", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One dry run (fused and the plain call), with what was on disk when the second path started."""
    out = tmp_path_factory.mktemp("profile") / "p.json"
    on_disk_before = {}
    original = pf.profile_path

    def spy(name, *args, **kwargs):
        if out.exists():
            on_disk_before[name] = list(json.loads(out.read_text())["paths"])
        return original(name, *args, **kwargs)

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(pf, "profile_path", spy)
        rc = pf.main([*ARGS, "--out", str(out)])
    return SimpleNamespace(rc=rc, out=out, data=json.loads(out.read_text()), printed=printed.getvalue(),
                           on_disk_before=on_disk_before)


def test_dry_run_writes_provenance_and_every_path(run):
    assert run.rc == 0, run.printed
    p = run.data["provenance"]
    for key in ("device", "torch", "triton", "commit", "date", "command"):
        assert p.get(key), key
    assert p["torch"] == torch.__version__
    assert "--paths fused,default" in p["command"]
    assert run.data["shape"]["name"] == "tiny-cpu" and run.data["head"] == "trainable"
    assert run.data["matmul_peak"]["tflops"] > 0
    assert list(run.data["paths"]) == ["fused", "default"]
    for name, rec in run.data["paths"].items():
        assert rec["status"] == "ok", (name, rec.get("error"), rec.get("traceback"))
        assert rec["wall_ms"]["median"] > 0 and rec["kernel_ms"] > 0
    assert run.data["paths"]["fused"]["peer"] == "triton_fused"
    assert run.data["paths"]["default"]["same_as"] in ("torch", "triton_fused")  # CPU: torch; CUDA: fused


def test_kernel_table_shares_add_up(run):
    for name, rec in run.data["paths"].items():
        rows = rec["kernels"]
        assert rows, name
        assert sum(r["pct"] for r in rows) == pytest.approx(100.0, abs=0.01)
        assert all(r["category"] in pf.CATEGORIES and r["calls"] > 0 and r["ms"] >= 0 for r in rows)
        assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
        cats = rec["categories"]
        assert [c["category"] for c in cats] == list(pf.CATEGORIES)
        assert sum(c["ms"] for c in cats) == pytest.approx(rec["kernel_ms"], rel=1e-9)
        assert sum(c["pct"] for c in cats) == pytest.approx(100.0, abs=0.01)
        assert rec["not_kernel_ms"] == pytest.approx(rec["wall_ms"]["median"] - rec["kernel_ms"])
        assert rec["host_syncs"]["per_step"] >= 0


def test_gemms_are_the_three_products_of_the_fused_path(run):
    """The fused path's products with a trainable head: logits, dlogits @ W and dlogits^T @ H, one unit each at the
    tiny shape (one chunk, one pass); their FLOPs come from the recorded operand shapes."""
    s = run.data["shape"]
    for name in ("fused", "default"):
        rec = run.data["paths"][name]
        assert rec["gemm"]["units"] == pytest.approx(3.0), name
        assert rec["work"]["useful_units"] == 3 and rec["work"]["planned_units"] == 3
        assert rec["chunks"]["chunks"] == 1 and rec["chunks"]["two_pass_chunks"] == 0
        shapes = [g for r in rec["kernels"] if r["category"] == "gemm" for g in r["shapes"]]
        assert sum(g["gflop"] * g["calls"] for g in shapes) == pytest.approx(
            3 * 2 * s["counted"] * s["D"] * s["V"] / 1e9)


def test_each_path_is_written_before_the_next_starts(run):
    assert run.on_disk_before == {"default": ["fused"]}
    md = run.out.with_suffix(".md").read_text()
    assert "## fused (triton_fused)" in md and "## default" in md and "| GEMM (op, shapes, dtypes)" in md
    assert run.printed.rstrip().endswith(f"wrote {run.out} and {run.out.with_suffix('.md')}")
    assert "| kernel | category |" in run.printed
    assert sorted(p.name for p in run.out.parent.iterdir()) == ["p.json", "p.md"]  # no scratch files left


@pytest.mark.parametrize(("argv", "named"), [
    (["--shape", "llama-9000"], "--shape"),
    (["--paths", "fused,bogus"], "--paths"),
    (["--paths", ","], "--paths"),
    (["--reps", "0"], "--reps"),
    (["--warmup", "-1"], "--warmup"),
])
def test_bad_arguments_are_named(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        pf.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {named}" in err or f"{named}:" in err, err
    if "bogus" in argv[-1]:
        assert "'bogus'" in err and "fused, default, compile" in err


# ----------------------------------------------------------------------------- the readers, on made-up events
def test_categories_of_kernel_and_op_names():
    gpu = {
        "nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT": "gemm",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": "gemm",
        "_row_lse_kernel": "triton",
        "_loss_dlogits_kernel": "triton",
        "triton_red_fused__log_softmax_gather_0": "triton",
        "Memcpy DtoH (Device -> Pageable)": "memcpy/memset",
        "Memset (Device)": "memcpy/memset",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >"
        "(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)": "elementwise/copy",
        "void at::native::(anonymous namespace)::indexSelectLargeIndex<float, long, unsigned int, 2, 2, -2, true>"
        "(...)": "elementwise/copy",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<...> > >"
        "(...)": "reduction",
        "void cub::DeviceRadixSortOnesweepKernel<...>(...)": "reduction",
        "some_unknown_kernel": "other",
    }
    for name, cat in gpu.items():
        assert pf.categorize(name, device_side=True) == cat, name
    cpu = {"aten::mm": "gemm", "aten::addmm_": "gemm", "aten::matmul": "other", "aten::amax": "reduction",
           "aten::exp_": "elementwise/copy", "aten::index_select": "elementwise/copy", "aten::view": "other",
           "aten::empty": "other", "FusedTupleLoss": "other"}
    for name, cat in cpu.items():
        assert pf.categorize(name, device_side=False) == cat, name
    assert pf.short_name("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
                         "std::array<char*, 1ul> >(int)") == "vectorized_elementwise_kernel[FillFunctor]"


def test_gemm_flops_from_operand_shapes():
    assert pf.gemm_flops("aten::mm", [[96, 64], [64, 1000]]) == 2 * 96 * 64 * 1000
    assert pf.gemm_flops("aten::mm", [[96, 64], [64, 1000], []]) == 2 * 96 * 64 * 1000  # out_dtype's scalar
    assert pf.gemm_flops("aten::addmm_", [[1000, 64], [1000, 96], [96, 64], [], []]) == 2 * 1000 * 96 * 64
    assert pf.gemm_flops("aten::addmm", [[1000], [96, 64], [64, 1000]]) == 2 * 96 * 64 * 1000
    assert pf.gemm_flops("aten::bmm", [[4, 8, 16], [4, 16, 32]]) == 2 * 4 * 8 * 16 * 32
    assert pf.gemm_flops("aten::mm", [[96, 64], [65, 1000]]) is None  # not a product of these operands
    assert pf.gemm_flops("aten::mm", [[96, 64]]) is None


def _event(name, start, end, parent=None, device=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), cpu_parent=parent,
                           device_type=DeviceType.CUDA if device else DeviceType.CPU)


def test_host_syncs_count_only_inside_steps():
    """Two steps, each with one .item() (a cudaStreamSynchronize under aten::item): one per step; the harness's
    own sync after the steps does not count; device-to-host copies are counted on the device timeline."""
    steps = [_event(pf.STEP, 0, 100), _event(pf.STEP, 200, 300)]
    events = list(steps)
    for s in steps:
        item = _event("aten::item", s.time_range.start + 10, s.time_range.start + 20, parent=s)
        dense = _event("aten::_local_scalar_dense", s.time_range.start + 11, s.time_range.start + 19, parent=item)
        events += [item, dense, _event("cudaStreamSynchronize", s.time_range.start + 12, s.time_range.start + 18,
                                       parent=dense),
                   _event("cudaLaunchKernel", s.time_range.start + 1, s.time_range.start + 2, parent=s),
                   _event("Memcpy DtoH (Device -> Pageable)", s.time_range.start + 13, s.time_range.start + 14,
                          device=True)]
    events.append(_event("cudaDeviceSynchronize", 310, 320))  # after the steps
    syncs = pf.host_syncs(events, steps=2)
    assert syncs["per_step"] == 1.0
    assert syncs["by_call"] == {"cudaStreamSynchronize": 1.0}
    assert syncs["sites"] == [dict(call="cudaStreamSynchronize", ops="aten::_local_scalar_dense < aten::item",
                                   per_step=1.0)]
    assert syncs["dtoh_copies_per_step"] == 1.0


def _gpu_profile(linked: bool = True):
    """A made-up CUDA profile built from torch's own event classes: a step range (with its GPU-timeline copy), a
    cuBLAS GEMM launched by aten::mm, one of our Triton kernels, an .item() with its sync and D2H copy. ``linked``:
    each kernel names its op (newer torch), else the ops list their kernels (older torch, no grids)."""
    from torch.autograd.profiler_util import EventList, FunctionEvent

    def ev(i, name, start, end, **kw):
        return FunctionEvent(id=i, name=name, thread=1, start_us=start, end_us=end, use_device="cuda", stack=[], **kw)

    gpu = dict(device_type=DeviceType.CUDA)
    events = EventList([
        ev(1, pf.STEP, 0, 1000, is_user_annotation=True),
        ev(2, "aten::mm", 10, 20, input_shapes=[[2048, 4096], [4096, 128256], []],
           input_dtypes=["c10::BFloat16", "c10::BFloat16", "ScalarType"]),
        ev(3, "aten::item", 30, 60),
        ev(4, "aten::_local_scalar_dense", 31, 59),
        ev(5, "cudaStreamSynchronize", 40, 58),
        ev(6, "cudaDeviceSynchronize", 1100, 1110),  # the harness's, after the step
        ev(10, "nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT", 100, 600, linked_correlation_id=2 * linked,
           extra_meta={"grid": "[132, 1, 1]", "block": "[384, 1, 1]", "blocks per SM": "1.0"}, **gpu),
        ev(11, "_row_lse_kernel", 600, 700, **gpu),
        ev(12, "Memcpy DtoH (Device -> Pageable)", 700, 710, linked_correlation_id=4 * linked, **gpu),
        ev(13, pf.STEP, 90, 720, is_user_annotation=True, **gpu),
    ], use_device="cuda")
    if not linked:
        events[1].append_kernel("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT", 0, 500)
        events[3].append_kernel("Memcpy DtoH (Device -> Pageable)", 0, 10)
    events._build_tree()
    return SimpleNamespace(events=lambda: events, key_averages=events.key_averages)


@pytest.mark.parametrize("linked", [True, False], ids=["kernels-name-ops", "ops-list-kernels"])
def test_gpu_kernel_table_from_torch_events(linked):
    prof = _gpu_profile(linked)
    rows = pf.kernel_table(prof, on_gpu=True, steps=1)
    assert [(r["short"], r["category"], r["ms"]) for r in rows] == [
        ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT", "gemm", 0.5), ("_row_lse_kernel", "triton", 0.1),
        ("Memcpy DtoH (Device -> Pageable)", "memcpy/memset", 0.01)]  # not the step range's GPU copy
    assert sum(r["pct"] for r in rows) == pytest.approx(100.0)
    gemm = rows[0]
    assert gemm["launched_by"] == [["aten::mm", 1]]
    assert rows[1]["launched_by"] == ([["(no op)", 1]] if linked else [])  # older torch: only ops know kernels
    assert gemm["grids"] == ([dict(grid=[132, 1, 1], block=[384, 1, 1], blocks_per_sm=1.0, calls=1)] if linked
                             else [])
    (shape,) = gemm["shapes"]
    flops = 2 * 2048 * 4096 * 128256
    assert shape["shapes"] == [[2048, 4096], [4096, 128256]] and shape["gflop"] == pytest.approx(flops / 1e9)
    assert shape["tflops"] == pytest.approx(flops / 500e-6 / 1e12)
    syncs = pf.host_syncs(prof.events(), steps=1)
    assert syncs["by_call"] == {"cudaStreamSynchronize": 1.0} and syncs["dtoh_copies_per_step"] == 1.0
    assert syncs["sites"][0]["ops"] == "aten::_local_scalar_dense < aten::item"


# ----------------------------------------------------------------------------- the GPU suite's part
FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python on the GPU machine: the profile script writes a JSON and its .md, named by the head
if [ "${1:-}" = -m ] && [ "${2:-}" = benchmarks.profile_fused ]; then
  echo "${TSPIN_CHUNK_ELEMENTS:+TSPIN_CHUNK_ELEMENTS=$TSPIN_CHUNK_ELEMENTS }$*" >> "$ARGS_LOG"
  head=trainable
  case "$*" in *--frozen*) head=frozen ;; esac
  out="benchmarks/results/fake-profile-$head.json"
  prev=""
  for a in "$@"; do [ "$prev" = --out ] && out="$a"; prev="$a"; done
  echo '{}' > "$out"
  echo '# md' > "${out%.json}.md"
  exit 0
fi
echo "fake python: $*"
"""


def test_gpu_suite_profile_part_brings_back_json_and_markdown(tmp_path):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and timeout")
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_suite.sh", repo / "benchmarks" / "gpu_suite.sh")
    (repo / "benchmarks" / "results" / "older.md").write_text("from an earlier run\n")  # not changed: stays
    os.utime(repo / "benchmarks" / "results" / "older.md", (0, 0))
    fake = tmp_path / "python"
    fake.write_text(textwrap.dedent(FAKE_PYTHON))
    fake.chmod(0o755)
    out, args = tmp_path / "out", tmp_path / "args"
    out.mkdir()
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), ARGS_LOG=str(args))
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_suite.sh"), "profile"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    day = time.strftime("%Y%m%d", time.gmtime())
    cap = f"profile-llama3-8b-fused-cap2e29-{day}"
    assert sorted(p.name for p in out.iterdir()) == ["fake-profile-frozen.json", "fake-profile-frozen.md",
                                                     "fake-profile-trainable.json", "fake-profile-trainable.md",
                                                     "gpu-profile.log", f"{cap}.json", f"{cap}.md"]
    assert len(list(out.iterdir())) <= 8  # the device tool brings back 8 files at most
    runs = args.read_text().splitlines()
    assert runs == ["-m benchmarks.profile_fused --shape llama3-8b --paths fused,default,compile",
                    "-m benchmarks.profile_fused --shape llama3-8b --paths fused --frozen",
                    "TSPIN_CHUNK_ELEMENTS=536870912 -m benchmarks.profile_fused --shape llama3-8b --paths fused "
                    f"--out benchmarks/results/{cap}.json"]
