"""Time the fused forward and backward kernels under several tile configs at one benchmark shape, on this GPU.

Kernels: ``fwd``, ``bwd`` (the atomic backward) and ``bwd_mm`` (``backward="matmul"``, whose tiles are those of its
dlogits kernel; its cuBLAS products do not change). Every candidate is first checked against the built-in config's
results (token log-probs and log-sum-exps to 1e-3; the gradients, whose float32 sums may add in another order, to
a relative 1e-3 in float32, 1e-2 in 16 bits), then timed with CUDA events (median of --reps launches after one
warm-up). A candidate the GPU cannot launch (shared memory, registers) is recorded with its error, not fatal.
Results go to
benchmarks/results/tile-sweep-<device>-<yyyymmdd>.json with their provenance; the fastest correct config per kernel
is what the API's ``tiles={"fwd": ..., "bwd": ...}`` takes (or ``TSPIN_TILES_FWD`` / ``TSPIN_TILES_BWD`` as
defaults), or what ``tile_config`` should return for this GPU, and ``bwd`` against ``bwd_mm`` says which
``backward=`` should be the default here.

    python -m benchmarks.tile_sweep [--shape llama3-8b] [--kernels fwd bwd bwd_mm] [--tiles "64,128,64,8,3" ...]
    TRITON_INTERPRET=1 python -m benchmarks.tile_sweep --shape tiny-cpu   # the code path on CPU (times are not GPU's)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import common
from tspin_kernels import _device, _options
from tspin_kernels._inputs import compact
from tspin_kernels.kernels import fused_logps as K

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): Hopper-sized tiles around the built-in one; bigger row and
# vocab blocks halve the backward's atomic traffic into grad_weight and grad_hidden respectively. Each compiles
# for sm_90 in bf16 within shared memory and without spills (python -m benchmarks.kernel_resources --tiles ...).
GPU_CANDIDATES = (
    "64,128,64,8,3", "64,128,64,4,3", "64,128,64,8,4", "64,128,128,8,2", "64,256,64,8,2", "64,256,32,8,3",
    "128,128,64,8,3", "128,128,32,8,3", "128,128,64,8,2", "128,256,64,8,2", "128,256,32,8,3", "128,256,32,8,4",
    "128,64,64,4,3", "64,64,64,4,4",
)
CPU_CANDIDATES = ("16,32,32,4,1", "32,32,16,4,1", "16,64,16,4,1")
SHAPES = {s.name: s for s in (*common.GPU_SHAPES, *common.CPU_SHAPES)}


def _inputs(shape, device, dtype, seed=0):
    """The benchmark's inputs (drawn on the device), compacted the way the public path compacts them."""
    hidden, weight, labels = common.make_inputs(shape, device, dtype, head_trainable=False, seed=seed)
    c = compact(hidden.detach(), labels, None, common.IGNORE_INDEX, shift=False, average=False)
    g_row = torch.randn(c.row_idx.numel(), generator=torch.Generator(device=device).manual_seed(seed + 1),
                        device=device)
    return c.hidden2d, weight.detach(), c.row_idx, c.target, g_row


def _time(fn, device, reps: int) -> float:
    fn()  # warm-up (and compile)
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def sweep(shape, kernels, candidates, device, dtype, reps: int) -> list[dict]:
    hidden, weight, row_idx, target, g_row = _inputs(shape, device, dtype)
    fwd = lambda tiles: K.logps_forward(hidden, weight, None, row_idx, target, tiles=tiles)  # noqa: E731
    ref_tok, ref_lse = fwd(None)
    args = (hidden, weight, None, row_idx, target, ref_lse, g_row, True, True, False)
    runs = {"fwd": lambda t: fwd(t), "bwd": lambda t: K.logps_backward(*args, tiles=t),
            "bwd_mm": lambda t: K.logps_backward_matmul(*args, tiles=t)}
    ref_grads = runs["bwd"](None) if {"bwd", "bwd_mm"} & set(kernels) else None
    default = {k: K._config(device, dtype, "fwd" if k == "fwd" else "bwd") for k in kernels}
    # units of 2*N_counted*D*V: forward 1, backward with a trainable head 2 (the recompute is not counted)
    work = {"fwd": 1, "bwd": 2, "bwd_mm": 2}
    flops = 2.0 * row_idx.numel() * shape.D * shape.V
    # gradients: another summation order moves float32 sums by ~1e-6; a 16-bit rounding of a product (matmul
    # backward without out_dtype) by ~1e-3; a wrong tile or offset by O(1)
    grad_tol = 1e-3 if dtype == torch.float32 else 1e-2
    records = []
    for kernel in kernels:
        for raw in tqdm(candidates, desc=f"{shape.name} {kernel}", disable=not sys.stderr.isatty()):
            tiles = _options.parse_tiles(raw, "--tiles")
            rec = dict(kernel=kernel, tiles=raw, default=tiles == default[kernel])
            fn = (lambda t=tiles, k=kernel: runs[k](t))
            try:
                out = fn()
                if kernel == "fwd":
                    rec["max_abs_diff"] = max(float((out[0] - ref_tok).abs().max()),
                                              float((out[1] - ref_lse).abs().max()))
                    rec["correct"] = rec["max_abs_diff"] <= 1e-3
                else:
                    rec["rel_diff"] = max(_rel(a, b) for a, b in zip(out[:2], ref_grads[:2]))
                    rec["correct"] = rec["rel_diff"] <= grad_tol
                del out
                rec["seconds"] = _time(fn, device, reps)
                rec["tflops"] = work[kernel] * flops / rec["seconds"] / 1e12
            except Exception as e:  # out of resources, compile failure: recorded, the sweep goes on
                rec.update(correct=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            records.append(rec)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def best(records, kernel) -> dict | None:
    ok = [r for r in records if r["kernel"] == kernel and r.get("correct") and r.get("seconds")]
    return min(ok, key=lambda r: r["seconds"]) if ok else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default llama3-8b on GPU, tiny-cpu on CPU")
    ap.add_argument("--kernels", nargs="+", default=["fwd", "bwd", "bwd_mm"], choices=["fwd", "bwd", "bwd_mm"],
                    help="bwd: the atomic backward; bwd_mm: backward='matmul' (its dlogits kernel's tiles)")
    ap.add_argument("--tiles", nargs="+", default=None, help="candidates 'BM,BN,BK,warps,stages' (default: a grid)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="default benchmarks/results/tile-sweep-<device>-<day>.json")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not _device.interpreting():
        ap.error("needs a CUDA GPU, or TRITON_INTERPRET=1 (set before starting) to exercise the code on CPU")
    if a.reps < 1:
        ap.error("--reps must be >= 1")
    device = torch.device("cuda" if cuda else "cpu")
    shape = SHAPES[a.shape or ("llama3-8b" if cuda else "tiny-cpu")]
    candidates = a.tiles or (GPU_CANDIDATES if cuda else CPU_CANDIDATES)
    for raw in candidates:
        try:
            _options.parse_tiles(raw, "--tiles")
        except ValueError as e:
            ap.error(str(e))
    dtype = getattr(torch, a.dtype) if cuda else torch.float32
    records = sweep(shape, a.kernels, candidates, device, dtype, a.reps)
    result = {**common.provenance(), "shape": shape.name, "dtype": str(dtype).replace("torch.", ""), "reps": a.reps,
              "records": records, "best": {k: best(records, k) for k in a.kernels}}
    day = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%d}"
    out = a.json or common.RESULTS_DIR / f"tile-sweep-{common.device_slug()}-{day}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"{result['device']}, {shape.name}, {result['dtype']}, torch {result['torch']}, triton {result['triton']}, "
          f"commit {result['commit']}")
    print("| kernel | tiles | default | correct | ms | TFLOP/s | error |\n|---|---|---|---|---|---|---|")
    for r in records:
        ms = f"{r['seconds'] * 1e3:.2f}" if r.get("seconds") else ""
        tf = f"{r['tflops']:.3g}" if r.get("tflops") else ""
        print(f"| {r['kernel']} | {r['tiles']} | {'yes' if r['default'] else ''} | {r.get('correct')} | {ms} | {tf} | "
              f"{r.get('error', '')[:60]} |")
    for k, r in result["best"].items():
        print(f"best {k}: {r['tiles'] if r else 'none correct'}" + (f" ({r['seconds'] * 1e3:.2f} ms)" if r else ""))
    print(f"wrote {out}")
    return 0 if all(result["best"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
