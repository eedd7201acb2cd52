"""Profile the T-SPIN loss's forward+backward per kernel (torch.profiler) at one benchmark shape: where a path's time
above the matmul roofline goes.

Per path (``fused``: ``tspin_loss(..., impl="triton", fused=True)``; ``default``: the plain call
``tspin_loss(h, W, labels)``; ``compile``: ``torch.compile`` of the naive loss; or any peer name of
``benchmarks/peers.py``): warm-up steps (compiles, autotunes), timed steps (CUDA events, no profiler), then a few
steps under ``torch.profiler`` (CUDA activity on a GPU; CPU activity otherwise, so the script dry-runs on the CPU).
A step is ``loss.backward()`` from cleared gradients, as in ``benchmarks/test_kernels.py`` (mode ``fwd_bwd``).

Recorded per path, per step: the wall time; the per-kernel table (kernel, calls, total and mean device time, % of
the kernel time, the CPU op that launched it, grids; for GEMMs the operand shapes and dtypes from
``record_shapes`` with achieved TFLOP/s); a summary by category (gemm, triton, elementwise/copy, memcpy/memset,
reduction, other); host syncs (``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` / ``cudaEventSynchronize`` /
blocking ``cudaMemcpy`` inside a step, each with the ops that made it; on CUDA also the source lines, from one more
step under torch's sync debug mode) and device-to-host copies; the work in matmul units against the measured
matmul peak (the roofline); for the fused loss path its chunk plan (how many chunks, which take two passes). On
the CPU the "kernels" are the aten ops (self CPU time) and Triton's interpreter time sits in its caller's row: the
dry run checks the code path, its numbers are not the GPU's.

One JSON (provenance, command line, shape) is written after every path (atomically), so a run cut short keeps the
paths that finished, with a Markdown rendering next to it (same stem, ``.md``); the compact table is printed last.

    python -m benchmarks.profile_fused [--shape llama3-8b] [--paths fused,default,compile] [--frozen] [--out PATH]
        [--trace DIR]
    TRITON_INTERPRET=1 python -m benchmarks.profile_fused --shape tiny-cpu --paths fused,default   # CPU dry run
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import importlib
import pkgutil
import re
import shlex
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import common, peers
from tspin import io
from tspin_kernels import _device, loss_path
from tspin_kernels.fused_loss import plan_chunks

SHAPES = {s.name: s for s in (*common.GPU_SHAPES, *common.CPU_SHAPES)}
# path names of the issue -> the peer (benchmarks/peers.py) that runs it; every peer's own name works too
PATHS = {"fused": "triton_fused", "default": "default", "compile": "compile", **{p: p for p in peers.PEERS}}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STEP = "profile_fused.step"  # the record_function around each profiled step: host syncs are counted inside it
CATEGORIES = ("gemm", "triton", "elementwise/copy", "memcpy/memset", "reduction", "other")
# CUDA runtime / driver calls that block the host until the device catches up (a D2H copy of .item() / .tolist()
# is a cudaMemcpyAsync followed by a cudaStreamSynchronize)
SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                        "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpyDtoH_v2"})
TOP_PRINTED, TOP_MARKDOWN = 10, 25


# ---------------------------------------------------------------------------------------------- names, categories
@functools.cache
def triton_kernel_names() -> frozenset[str]:
    """Names of the library's ``@triton.jit`` functions (a Triton kernel runs on the GPU under its function's name)."""
    if not _device.triton_importable():
        return frozenset()
    import tspin_kernels.kernels as kernels

    names = set()
    for m in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"{kernels.__name__}.{m.name}")
        for obj in vars(mod).values():  # JITFunction, or InterpretedFunction under TRITON_INTERPRET
            fn = getattr(obj, "fn", None)
            if callable(fn) and type(obj).__module__.startswith("triton"):
                names.add(fn.__name__)
    return frozenset(names)


_KERNEL_RULES = (  # device kernels by name, first match wins (cuBLAS on Hopper names its GEMMs nvjet_* / sm90_xmma_*)
    ("memcpy/memset", re.compile(r"^(memcpy|memset)", re.I)),
    ("gemm", re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas|splitkreduce|s16816|s1688|wgmma", re.I)),
    ("reduction", re.compile(r"reduce|softmax|logsumexp|sort|scan|cub::|argmax|topk|norm_kernel", re.I)),
    ("elementwise/copy", re.compile(r"elementwise|copy|index|scatter|gather|fill|catarray|where|masked|zero", re.I)),
)
# the products themselves: aten::matmul / linear only dispatch to these (their FLOPs must not count twice)
_CPU_GEMM = re.compile(r"^aten::(mm|addmm_?|bmm|baddbmm_?|addbmm_?|addmv_?|mv|dot)$")
_CPU_REDUCTION = re.compile(r"^aten::(sum|mean|amax|amin|max|min|logsumexp|_?log_softmax|_?softmax|sort|argsort|"
                            r"cumsum|any|all|nonzero|norm|argmax|topk|count_nonzero)$")
# views, allocations and composite ops that only dispatch (matmul -> mm): no work of their own but host overhead
_CPU_NO_DATA = re.compile(r"^aten::(matmul|linear|empty\w*|view\w*|as_strided|slice|select|reshape|_reshape_alias|"
                          r"permute|t|transpose|expand\w*|detach\w*|alias|unsqueeze|squeeze|set_|resize_|lift_fresh|"
                          r"result_type|to|unbind|split\w*|chunk|narrow|contiguous|is_nonzero|item|"
                          r"_local_scalar_dense)$")


def categorize(name: str, device_side: bool) -> str:
    """The category of a device kernel (``device_side``) or, on the CPU, of an aten op."""
    if device_side:
        base = re.split(r"[<(\s]", name.removeprefix("void "), maxsplit=1)[0].split("::")[-1]
        # ours (older Tritons append a signature suffix to the name), or torch.compile's (Inductor's triton_*)
        if base.startswith("triton_") or any(base.startswith(n) for n in triton_kernel_names()):
            return "triton"
        return next((cat for cat, rx in _KERNEL_RULES if rx.search(name)), "other")
    if _CPU_GEMM.match(name):
        return "gemm"
    if _CPU_REDUCTION.match(name):
        return "reduction"
    if name.startswith("aten::") and not _CPU_NO_DATA.match(name):
        return "elementwise/copy"
    return "other"  # views, allocations, autograd nodes (on the CPU a Triton kernel's interpreter time is here)


_TEMPLATE_HINT = re.compile(r"(\w+(?:Functor|_kernel_cuda|_kernel_impl|Op))\b")


def short_name(name: str) -> str:
    """A kernel's readable name: ``vectorized_elementwise_kernel[FillFunctor]`` for the long C++ template names."""
    if not name.startswith("void ") and "<" not in name:
        return name  # a plain name: nvjet_*, a Triton kernel, "Memcpy DtoH (Device -> Pageable)"
    s = name.removeprefix("void ")
    cut = min((i for i in (s.find("<"), s.find("(")) if i >= 0), default=len(s))
    base = s[:cut].split("::")[-1] or s[:cut]
    hint = _TEMPLATE_HINT.search(s[cut:])
    return f"{base}[{hint.group(1)}]" if hint else base


def gemm_flops(op: str, shapes) -> float | None:
    """FLOPs of one matrix product from its operands' shapes (``record_shapes``): 2*M*K*N (times the batch)."""
    base = op.split("::")[-1].split(".")[0]
    shapes = list(shapes or [])
    if base in ("addmm", "addmm_", "baddbmm", "baddbmm_", "addbmm", "addbmm_", "addmv", "addmv_"):
        shapes = shapes[1:]  # the added term comes first
    mats = [list(s) for s in shapes if isinstance(s, (list, tuple)) and len(s) in (1, 2, 3)]
    if len(mats) < 2:
        return None
    a, b = mats[:2]
    if len(a) == 2 and len(b) == 2 and a[1] == b[0]:
        return 2.0 * a[0] * a[1] * b[1]
    if len(a) == 2 and len(b) == 1 and a[1] == b[0]:
        return 2.0 * a[0] * a[1]
    if len(a) == 3 and len(b) == 3 and a[0] == b[0] and a[2] == b[1]:
        return 2.0 * a[0] * a[1] * a[2] * b[2]
    return None


# ---------------------------------------------------------------------------------------------- the profile
def _is_annotation(evt) -> bool:
    """record_function ranges (and their GPU-timeline copies), Python frames: spans over other events, no work."""
    kind = str(getattr(evt, "activity_type", "") or "")
    return (bool(getattr(evt, "is_user_annotation", False)) or bool(getattr(evt, "is_python_function", False))
            or "annotation" in kind)


def _device_side(evt) -> bool:
    return evt.device_type != DeviceType.CPU


def _launch_records(events, on_gpu: bool) -> list[dict]:
    """One record per kernel launch (GPU: the kernels, each with the CPU op that launched it; CPU: the aten ops
    themselves): name, microseconds, op, operand shapes and dtypes, grid."""
    host = [e for e in events if not _device_side(e) and not _is_annotation(e)]
    if not on_gpu:
        return [_record(e.name, e.self_cpu_time_total, e) for e in host]
    kernels = [e for e in events if _device_side(e) and not _is_annotation(e)]
    if any(getattr(e, "linked_correlation_id", 0) for e in kernels):  # newer torch: each kernel names its op
        ops = {e.id: e for e in host}
        return [_record(e.name, e.device_time_total, ops.get(e.linked_correlation_id or None),
                        getattr(e, "event_metadata", None)) for e in kernels]
    # older torch: each op's list of the kernels it launched (no grids)
    return [_record(k.name, k.duration, e) for e in host for k in getattr(e, "kernels", [])]


def _record(name: str, us: float, op=None, meta=None) -> dict:
    grid, block = getattr(meta, "grid", None), getattr(meta, "block", None)
    return dict(name=name, us=us, op=op.name if op else None, shapes=op.input_shapes if op else None,
                dtypes=getattr(op, "input_dtypes", None), grid=tuple(grid) if grid else None,
                block=tuple(block) if block else None, blocks_per_sm=getattr(meta, "blocks_per_sm", None))


def _top(counter: collections.Counter, n: int) -> list:
    return [[k, v] for k, v in counter.most_common(n)]


def _shape_key(shapes) -> str:
    return "x".join(str(list(s)) for s in (shapes or []) if s)


def kernel_table(prof, on_gpu: bool, steps: int) -> list[dict]:
    """The per-kernel rows, per step: torch.profiler's own aggregation (``key_averages``) for names, calls and
    times; the launches (``events``) for what key_averages drops (launching op, shapes, grids)."""
    events = prof.events()
    # record_function ranges also appear on the GPU timeline under their names: never counted as kernels
    ranges = {e.name for e in events if _is_annotation(e) and not _device_side(e)} | {STEP}
    rows = []
    for avg in prof.key_averages():
        if _is_annotation(avg) or avg.key in ranges or _device_side(avg) != on_gpu:
            continue  # on a GPU the kernels; on the CPU the ops
        us = avg.self_device_time_total if on_gpu else avg.self_cpu_time_total
        if us <= 0 and not on_gpu:
            continue
        rows.append(dict(name=avg.key, short=short_name(avg.key) if on_gpu else avg.key,
                         category=categorize(avg.key, on_gpu), calls=avg.count / steps, ms=us / 1e3 / steps,
                         mean_us=us / max(avg.count, 1)))
    total = sum(r["ms"] for r in rows) or 1.0
    for r in rows:
        r["pct"] = 100.0 * r["ms"] / total
    rows.sort(key=lambda r: -r["ms"])
    _attach_launch_details(rows, [x for x in _launch_records(events, on_gpu) if x["name"] not in ranges], on_gpu,
                           steps)
    return rows


def _attach_launch_details(rows: list[dict], launches: list[dict], on_gpu: bool, steps: int) -> None:
    """Per row: the ops that launched it and its grids (GPU); per GEMM row the operand shapes with TFLOP/s."""
    by_name = collections.defaultdict(list)
    for rec in launches:
        by_name[rec["name"]].append(rec)
    for r in rows:
        recs = by_name.get(r["name"], [])
        if on_gpu:
            r["launched_by"] = _top(collections.Counter(x["op"] or "(no op)" for x in recs), 3)
            grids = collections.Counter((x["grid"], x["block"], x["blocks_per_sm"]) for x in recs if x["grid"])
            r["grids"] = [dict(grid=list(g), block=list(b) if b else None, blocks_per_sm=bps, calls=n)
                          for (g, b, bps), n in grids.most_common(3)]
        if r["category"] == "gemm":
            r["shapes"] = _gemm_shapes(recs, steps)


def _gemm_shapes(recs: list[dict], steps: int) -> list[dict]:
    groups = collections.defaultdict(list)
    for x in recs:
        groups[(x["op"], _shape_key(x["shapes"]), str(x["dtypes"] or ""))].append(x)
    out = []
    for (op, _, _), xs in groups.items():
        us = sum(x["us"] for x in xs)
        flops = gemm_flops(op or "", xs[0]["shapes"])
        out.append(dict(op=op, shapes=[list(s) for s in (xs[0]["shapes"] or []) if s], dtypes=xs[0]["dtypes"],
                        calls=len(xs) / steps, ms=us / 1e3 / steps,
                        gflop=flops / 1e9 if flops else None,
                        tflops=flops * len(xs) / (us * 1e-6) / 1e12 if flops and us > 0 else None))
    out.sort(key=lambda g: -g["ms"])
    return out


def category_summary(rows: list[dict]) -> list[dict]:
    total = sum(r["ms"] for r in rows) or 1.0
    out = []
    for cat in CATEGORIES:
        mine = [r for r in rows if r["category"] == cat]
        ms = sum(r["ms"] for r in mine)
        out.append(dict(category=cat, ms=ms, pct=100.0 * ms / total, calls=sum(r["calls"] for r in mine),
                        kernels=len(mine)))
    return out


def host_syncs(events, steps: int) -> dict:
    """Host syncs per step: the blocking CUDA calls inside a STEP range (time containment: the backward's calls
    come from the autograd engine's own thread), each with the chain of ops that made it (innermost first)."""
    spans = [(e.time_range.start, e.time_range.end) for e in events
             if e.name == STEP and not _device_side(e)]

    def in_step(e) -> bool:
        return any(s <= e.time_range.start and e.time_range.end <= t for s, t in spans)

    calls, sites = collections.Counter(), collections.Counter()
    for e in events:
        if e.name in SYNC_CALLS and not _device_side(e) and in_step(e):
            calls[e.name] += 1
            chain, p = [], e.cpu_parent
            while p is not None and p.name != STEP and len(chain) < 4:
                chain.append(p.name)
                p = p.cpu_parent
            sites[(e.name, " < ".join(chain) or "(no op)")] += 1
    dtoh = sum(1 for e in events if _device_side(e) and e.name.lower().startswith("memcpy dtoh"))
    return dict(per_step=sum(calls.values()) / steps, by_call={k: v / steps for k, v in calls.items()},
                sites=[dict(call=c, ops=o, per_step=n / steps) for (c, o), n in sites.most_common(8)],
                dtoh_copies_per_step=dtoh / steps)


def sync_sources(step, device: torch.device) -> list[dict] | None:
    """The source lines of a step's synchronizing CUDA calls: one more step (unprofiled) under torch's sync debug
    mode, whose warning points at the Python line that asked for the sync (``.tolist()``, ``.item()``, ``bool``).
    None off CUDA (the mode is CUDA's)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lines = collections.Counter(f"{_in_repo(w.filename)}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    return [dict(where=k, per_step=n) for k, n in lines.most_common(10)]


def _in_repo(filename: str) -> str:
    path = Path(filename)
    return str(path.relative_to(common.ROOT)) if path.is_relative_to(common.ROOT) else filename


# ---------------------------------------------------------------------------------------------- timing and work
def _time_steps(step, device: torch.device, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` back-to-back steps: CUDA events (no sync between steps) or the CPU clock."""
    if device.type != "cuda":
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    marks[0].record()
    for i in range(reps):
        step()
        marks[i + 1].record()
    torch.cuda.synchronize(device)
    return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]


def matmul_peak(device: torch.device) -> dict:
    """The roofline: dense matmul TFLOP/s as ``benchmarks/test_kernels.py`` measures it (bf16 8192^3 on CUDA,
    float32 512^3 on the CPU), median of 20 (CPU: 5) runs after 3 warm-ups."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    ms = statistics.median(_time_steps(lambda: a @ b, device, 20 if device.type == "cuda" else 5))
    return dict(shape=f"{n}^3", dtype=str(dtype).removeprefix("torch."), ms=ms, tflops=2.0 * n**3 / ms / 1e9)


def chunk_plan(shape: common.Shape, device: torch.device, peer: str, trainable: bool) -> dict | None:
    """The fused loss path's chunks at this shape (the library's own ``plan_chunks``), for peers on that path: the
    units of work it does (3 per counted row, 2 frozen; a chunk of one tuple over the cap takes two passes: 4/3)."""
    if peer == "default":
        path = loss_path(device)
    elif peer in ("triton_fused", "torch"):
        path = loss_path(device, impl="triton" if peer == "triton_fused" else "torch", fused=True)
    else:
        return None
    if not path.fused:
        return None
    per_seq = shape.T - shape.T // 2  # counted positions per sequence (make_inputs ignores the first half)
    cap = path.chunk_elements
    plan = plan_chunks([3 * per_seq] * shape.B, shape.V, cap)
    base = 3 if trainable else 2
    rows = [p1 - p0 for p0, p1, _, _ in plan]
    two_pass = [r for r in rows if r * shape.V > cap]
    units = (sum(rows) * base + sum(two_pass)) / max(sum(rows), 1)
    return dict(cap_elements=cap, chunks=len(plan), rows_per_chunk=sorted(set(rows)),
                tuples_per_chunk=sorted({t1 - t0 for _, _, t0, t1 in plan}), two_pass_chunks=len(two_pass),
                sub_chunk_rows=max(1, cap // shape.V) if two_pass else None, units=units)


def work(shape: common.Shape, device: torch.device, peer: str, trainable: bool, plan: dict | None,
         peak_tflops: float) -> dict:
    """Matmul units of 2*N_counted*D*V: ``useful`` what the gradients need (3, frozen 2), ``path`` what the path
    does by its design (``peers.PATH_UNITS``), ``planned`` what the fused path's chunk plan does at this shape; each
    as milliseconds at the matmul peak."""
    unit = 2.0 * shape.counted * shape.D * shape.V
    same_as = peers.default_path(device)[0] if peer == "default" else peer
    useful = common.work_units("fwd_bwd", trainable)
    designed = common.path_units(same_as, "fwd_bwd", trainable, shape)
    planned = plan["units"] if plan else designed
    ms = lambda u: u * unit / (peak_tflops * 1e12) * 1e3 if u and peak_tflops else None  # noqa: E731
    return dict(unit_gflop=unit / 1e9, useful_units=useful, path_units=designed, planned_units=planned,
                roofline_ms=ms(useful), path_roofline_ms=ms(planned))


# ---------------------------------------------------------------------------------------------- one path
def profile_path(name: str, tensors, device: torch.device, shape: common.Shape, trainable: bool, a,
                 peak_tflops: float, trace: Path | None) -> dict:
    peer = PATHS[name]
    reason = peers.unavailable(peer, device)
    if reason:
        return dict(peer=peer, status="skipped", reason=reason)
    hidden, weight, labels = tensors
    weight.requires_grad_(trainable)
    fn = peers.PEERS[peer]

    def step():
        common.clear_grads(hidden, weight)
        fn(hidden, weight, labels, trainable).backward()

    rec = dict(peer=peer, status="ok")
    if peer == "default":
        rec["same_as"], rec["loss_path"] = peers.default_path(device)
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    common.sync(device)
    rec["warmup_s"] = time.perf_counter() - t0  # the first call compiles (Triton JIT, torch.compile)
    times = _time_steps(step, device, a.reps)
    rec["wall_ms"] = dict(median=statistics.median(times), mean=statistics.fmean(times), min=min(times), reps=a.reps)
    prof = _profile(step, device, a.profile_steps)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        rec["trace"] = str(trace)
    on_gpu = device.type == "cuda"
    rows = kernel_table(prof, on_gpu, a.profile_steps)
    events = prof.events()
    spans = [e.time_range.elapsed_us() for e in events if e.name == STEP and not _device_side(e)]
    busy = sum(r["ms"] for r in rows)
    rec.update(profiled_step_ms=statistics.fmean(spans) / 1e3 if spans else None, kernel_ms=busy,
               not_kernel_ms=rec["wall_ms"]["median"] - busy)
    plan = chunk_plan(shape, device, peer, trainable)
    rec["work"] = work(shape, device, peer, trainable, plan, peak_tflops)
    rec["chunks"] = plan
    gemm = [g for r in rows if r["category"] == "gemm" for g in r.get("shapes", [])]
    flops = sum(g["gflop"] * g["calls"] for g in gemm if g["gflop"])
    gemm_ms = sum(g["ms"] for g in gemm if g["gflop"])
    rec["gemm"] = dict(ms=sum(r["ms"] for r in rows if r["category"] == "gemm"), gflop=flops,
                       units=flops * 1e9 / (2.0 * shape.counted * shape.D * shape.V),
                       tflops=flops / gemm_ms if gemm_ms else None)
    rec["categories"] = category_summary(rows)
    rec["host_syncs"] = host_syncs(events, a.profile_steps)
    rec["host_syncs"]["sources"] = sync_sources(step, device)
    rec["kernels"] = rows
    return rec


def _profile(step, device: torch.device, steps: int):
    """``steps`` steps under torch.profiler, each in a STEP range; the final sync (outside the ranges) lets the
    last step's kernels finish inside the profile. No ``with_stack``: its Python tracer slows every Python call (the
    whole of Triton's interpreter) and torch 2.13 fails to parse some of its frames; :func:`sync_sources` names
    the source lines of the syncs instead."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            with record_function(STEP):
                step()
        common.sync(device)
    return prof


# ---------------------------------------------------------------------------------------------- rendering
def _f(x, spec=".2f") -> str:
    return "" if x is None else format(x, spec)


def render(result: dict, top: int, details: bool) -> str:
    """The Markdown tables: per path a summary line, the categories and the ``top`` kernels (``details``: GEMM
    shapes, host sync sites and the chunk plan too)."""
    p, s = result["provenance"], result["shape"]
    peak = result.get("matmul_peak") or {}
    out = [f"# profile: {s['name']} (D={s['D']}, V={s['V']}, B={s['B']}, T={s['T']}, {s['counted']} counted), "
           f"{result['dtype']}, head {result['head']}",
           f"{p['device']}, torch {p['torch']}, triton {p['triton']}, commit {p['commit']}, {p['date']}; matmul peak "
           f"{_f(peak.get('tflops'), '.3g')} TFLOP/s ({peak.get('dtype')} {peak.get('shape')})", f"`{p['command']}`"]
    for name, r in result["paths"].items():
        out.append("")
        if r["status"] != "ok":
            out.append(f"## {name} ({r['peer']}): {r['status']}: {r.get('reason') or r.get('error')}")
            continue
        w, hs = r["work"], r["host_syncs"]
        out.append(f"## {name} ({r['peer']}{', = ' + r['same_as'] if r.get('same_as') else ''}): "
                   f"{_f(r['wall_ms']['median'])} ms/step (kernels {_f(r['kernel_ms'])}, not kernels "
                   f"{_f(r['not_kernel_ms'])}); roofline {_f(w['roofline_ms'])} ms ({w['useful_units']} units), "
                   f"path {_f(w['path_roofline_ms'])} ms ({_f(w['planned_units'], '.3g')} units); GEMMs "
                   f"{_f(r['gemm']['ms'])} ms, {_f(r['gemm']['units'], '.3g')} units at "
                   f"{_f(r['gemm']['tflops'], '.3g')} TFLOP/s; host syncs {_f(hs['per_step'], '.3g')}/step, "
                   f"D2H copies {_f(hs['dtoh_copies_per_step'], '.3g')}/step")
        out += ["", "| category | ms/step | % | calls/step | kernels |", "|---|---|---|---|---|"]
        out += [f"| {c['category']} | {_f(c['ms'], '.3f')} | {_f(c['pct'], '.1f')} | {_f(c['calls'], '.3g')} | "
                f"{c['kernels']} |" for c in r["categories"] if c["kernels"]]
        out += ["", "| kernel | category | calls/step | ms/step | mean us | % | launched by / grid |",
                "|---|---|---|---|---|---|---|"]
        for k in r["kernels"][:top]:
            by = ", ".join(f"{op} x{n}" for op, n in k.get("launched_by", [])[:2])
            grid = k.get("grids") or []
            if grid:
                g = grid[0]
                by += f"; grid {g['grid']} ({_f(g['blocks_per_sm'], '.2f')} blocks/SM)"
            out.append(f"| {k['short'][:60]} | {k['category']} | {_f(k['calls'], '.3g')} | {_f(k['ms'], '.3f')} | "
                       f"{_f(k['mean_us'], '.1f')} | {_f(k['pct'], '.1f')} | {by[:90]} |")
        if len(r["kernels"]) > top:
            out.append(f"| ({len(r['kernels']) - top} more in the JSON) | | | "
                       f"{_f(sum(k['ms'] for k in r['kernels'][top:]), '.3f')} | | | |")
        out += _details(r) if details else _brief(r)
    return "\n".join(out) + "\n"


def _chunk_line(r: dict) -> list[str]:
    c = r.get("chunks")
    if not c:
        return []
    return [f"Chunk plan: {c['chunks']} chunks of {c['rows_per_chunk']} rows ({c['tuples_per_chunk']} tuples), cap "
            f"{c['cap_elements']} logits; {c['two_pass_chunks']} take two passes"
            + (f" in sub-chunks of {c['sub_chunk_rows']} rows" if c["sub_chunk_rows"] else "")
            + f": {_f(c['units'], '.3g')} units of work."]


def _brief(r: dict) -> list[str]:
    """The printed version's last lines: the chunk plan and where the syncs come from, one line each."""
    sources = r["host_syncs"].get("sources") or []
    out = [""] + _chunk_line(r) if r.get("chunks") or sources else []
    if sources:
        out.append("Syncs at: " + ", ".join(f"{x['where']} x{x['per_step']}" for x in sources[:4]))
    return out


def _details(r: dict) -> list[str]:
    out = ["", "| GEMM (op, shapes, dtypes) | calls/step | ms/step | GFLOP | TFLOP/s |", "|---|---|---|---|---|"]
    for k in r["kernels"]:
        for g in k.get("shapes", []):
            dt = ",".join(d for d in (g["dtypes"] or []) if d)
            out.append(f"| {g['op']} {g['shapes']} {dt} ({k['short'][:40]}) | {_f(g['calls'], '.3g')} | "
                       f"{_f(g['ms'], '.3f')} | {_f(g['gflop'], '.4g')} | {_f(g['tflops'], '.3g')} |")
    sites = r["host_syncs"]["sites"]
    if sites:
        out += ["", "| host sync | per step | op chain (innermost first) |", "|---|---|---|"]
        out += [f"| {x['call']} | {_f(x['per_step'], '.3g')} | {x['ops']} |" for x in sites]
    sources = r["host_syncs"].get("sources")
    if sources:
        out += ["", "| synchronizing call (torch.cuda sync debug mode) | per step |", "|---|---|"]
        out += [f"| {x['where']} | {x['per_step']} |" for x in sources]
    return out + ([""] + _chunk_line(r) if r.get("chunks") else [])


# ---------------------------------------------------------------------------------------------- main
def _paths_arg(raw: str) -> list[str]:
    """``--paths``: comma-separated names of PATHS (argparse names the argument in the error)."""
    names = [p.strip() for p in raw.split(",") if p.strip()]
    bad = [p for p in names if p not in PATHS]
    if bad or not names:
        what = f"unknown path {bad[0]!r}" if bad else "no path given"
        raise argparse.ArgumentTypeError(f"{what}; choose from {', '.join(PATHS)} (comma-separated)")
    return list(dict.fromkeys(names))


def _count(raw: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {n}")
    return n


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_fused", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default llama3-8b on GPU, tiny-cpu on CPU")
    ap.add_argument("--paths", type=_paths_arg, default=["fused", "default", "compile"],
                    help="comma-separated: fused, default, compile or peer names (default: fused,default,compile)")
    ap.add_argument("--frozen", action="store_true", help="a frozen head (no weight gradient) instead of trainable")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--warmup", type=_count, default=None, help="untimed steps first (default GPU 3, CPU 1)")
    ap.add_argument("--reps", type=_count, default=None, help="timed steps (default GPU 10, CPU 2)")
    ap.add_argument("--profile-steps", type=_count, default=None, help="profiled steps (default GPU 5, CPU 1)")
    ap.add_argument("--out", type=Path, default=None,
                    help="the JSON (default benchmarks/results/<device>-profile-<shape>[-frozen]-<yyyymmdd>.json)")
    ap.add_argument("--trace", type=Path, default=None, metavar="DIR",
                    help="also write a Chrome trace per path into DIR (large)")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    for arg, gpu, cpu in (("warmup", 3, 1), ("reps", 10, 2), ("profile_steps", 5, 1)):
        if getattr(a, arg) is None:
            setattr(a, arg, gpu if cuda else cpu)
    if a.reps < 1 or a.profile_steps < 1:
        ap.error(f"argument --{'reps' if a.reps < 1 else 'profile-steps'}: must be >= 1")
    a.shape = a.shape or ("llama3-8b" if cuda else "tiny-cpu")
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    return a


def default_out(shape: str, frozen: bool) -> Path:
    day = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%d}"
    return common.RESULTS_DIR / f"{common.device_slug()}-profile-{shape}{'-frozen' if frozen else ''}-{day}.json"


def main(argv=None) -> int:
    a = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    device = common.bench_device()
    shape, dtype, trainable = SHAPES[a.shape], DTYPES[a.dtype], not a.frozen
    out = a.out or default_out(shape.name, a.frozen)
    now = datetime.datetime.now(datetime.timezone.utc)
    result = dict(
        kind="profile_fused",
        provenance=dict(common.provenance(), date=now.isoformat(timespec="seconds"),
                        command=shlex.join(["python", "-m", "benchmarks.profile_fused", *argv])),
        shape=dict(name=shape.name, D=shape.D, V=shape.V, B=shape.B, T=shape.T, rows=shape.rows,
                   counted=shape.counted),
        dtype=a.dtype, head="trainable" if trainable else "frozen",
        settings=dict(warmup=a.warmup, reps=a.reps, profile_steps=a.profile_steps),
        matmul_peak=matmul_peak(device), paths={})
    print(f"[profile] {result['provenance']['device']} {shape.name} {a.dtype} {result['head']}: "
          f"matmul peak {result['matmul_peak']['tflops']:.3g} TFLOP/s; writing {out}", flush=True)
    tensors = common.make_inputs(shape, device, dtype, True)
    failed = False
    for name in a.paths:
        trace = a.trace / f"{out.stem}-{name}.trace.json" if a.trace else None
        t0 = time.perf_counter()
        try:
            rec = profile_path(name, tensors, device, shape, trainable, a, result["matmul_peak"]["tflops"], trace)
        except Exception as e:  # one path failing (memory, a compile error) must not lose the others
            rec = dict(peer=PATHS[name], status="error", error=f"{type(e).__name__}: {str(e)[:500]}",
                       traceback=traceback.format_exc()[-3000:])
        failed |= rec["status"] != "ok"
        rec["seconds"] = time.perf_counter() - t0
        result["paths"][name] = rec
        _write(out, result)  # after every path: a run cut short keeps the paths that finished
        ms = rec.get("wall_ms", {}).get("median")
        print(f"[profile] {name}: {rec['status']}" + (f", {ms:.3f} ms/step" if ms else f": {rec.get('reason') or ''}"
              f"{rec.get('error') or ''}") + f" ({rec['seconds']:.0f} s)", flush=True)
        common.clear_grads(*tensors)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(render(result, TOP_PRINTED, details=False), end="")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 1 if failed else 0


def _write(out: Path, result: dict) -> None:
    io.atomic_write_json(out, result)
    io.atomic_write_text(out.with_suffix(".md"), render(result, TOP_MARKDOWN, details=True))


if __name__ == "__main__":
    sys.exit(main())
