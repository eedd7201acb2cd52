"""Compile the fused kernels for NVIDIA GPUs on any machine (no GPU needed) and report what they use.

For each architecture, dtype and kernel variant, the tile config the launcher would pick
(``fused_logps.tile_config``) is compiled through Triton's own specialisation of a launch (``JITFunction.warmup``
on shape-only tensors), then read back: registers and local memory (spills) from the cubin, shared memory from the
compiler, which tensor-core instruction the products use, and the atomics and barriers in the SASS. A config
that needs more shared memory than the architecture offers fails at launch ("out of resources") on that GPU;
this finds it here first.

    python -m benchmarks.kernel_resources [--arch 80 86 90 100 120] [--json FILE]
    python -m benchmarks.kernel_resources --arch 90 --dtype bfloat16 --tiles 128,256,64,8,3   # candidate tiles

Exits 1 when a config exceeds its architecture's shared memory, spills registers, or its machine code holds an
atomic other than a plain reduction (REDG): Triton's default atomic_add (acq_rel) compiles to ATOMG with a
GPU-wide MEMBAR and an L1 invalidate (CCTL.IVALL) per call, where gradient sums need atomicity only.
Needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# sm_XX: (compute capability, the GPUs it stands for): one per class of shared-memory size we pick tiles for
ARCHS = {80: ((8, 0), "A100"), 86: ((8, 6), "RTX 30xx/40xx, A10, L4"), 90: ((9, 0), "H100 / H200"),
         100: ((10, 0), "B200"), 120: ((12, 0), "RTX 50xx")}
# the tensor-core instruction each generation should use (PTX): anything else is a slow fallback
MMA = {"wgmma": "wgmma.mma_async", "tcgen05": "tcgen05.mma", "mma.sync": "mma.sync"}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# (D, V, counted rows): the llama3-8b benchmark shape; only divisibility by 16 and == 1 reach the compiler
D_, V_, NC_ = 4096, 128256, 8190


class _CompileOnlyDriver:
    """The slice of Triton's active driver that compiling (not launching) asks for, with a chosen target."""

    def __init__(self, capability: tuple[int, int]):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)

    def get_current_device(self):
        # Triton caches its compiler per device id: one id per target, so targets never share compiled kernels
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _variants(dt):
    """(name, kernel, positional args, constexpr kwargs) for every variant the launchers can launch."""
    from triton.runtime.jit import MockTensor

    from tspin_kernels.kernels import fused_logps as K

    h, w = MockTensor(dt, [NC_, D_]), MockTensor(dt, [V_, D_])
    i64, f32 = MockTensor(torch.int64), MockTensor(torch.float32)
    strides = (D_, 1, D_, 1)  # contiguous hidden and weight
    fwd = (h, w, w, i64, i64, f32, f32, NC_, V_, D_, 1024, 126, *strides)
    bwd = (h, w, w, i64, i64, f32, f32, i64, f32, f32, f32, NC_, 0, 16384, D_, 0.0, *strides)
    flags = dict(COMPUTE_GH=True, COMPUTE_GB=False, FILTER=False, HAS_SLOTS=False, GROUP_M=8)
    dl = (h, w, w, i64, i64, f32, f32, MockTensor(dt, [NC_, 8192]), NC_, 0, 8192, D_, *strides, 8192)
    return [
        ("forward", K._fwd_kernel, fwd, dict(HAS_BIAS=False)),
        ("forward+bias", K._fwd_kernel, fwd, dict(HAS_BIAS=True)),
        ("backward", K._bwd_kernel, bwd, dict(HAS_BIAS=False, COMPUTE_GW=True, **flags)),
        ("backward frozen head", K._bwd_kernel, bwd, dict(HAS_BIAS=False, COMPUTE_GW=False, **flags)),
        ("backward+bias+filter", K._bwd_kernel, bwd,
         dict(flags, HAS_BIAS=True, COMPUTE_GW=True, COMPUTE_GB=True, FILTER=True)),
        ("backward repeated rows", K._bwd_kernel, bwd, dict(flags, HAS_BIAS=False, COMPUTE_GW=True, HAS_SLOTS=True)),
        ("dlogits (matmul backward)", K._dlogits_kernel, dl, dict(HAS_BIAS=False, GROUP_M=8)),
        ("dlogits+bias", K._dlogits_kernel, dl, dict(HAS_BIAS=True, GROUP_M=8)),
    ]


def _epilogue_variants(dt):
    """The fused loss path's Triton epilogues (``kernels/fused_loss.py``): row work between cuBLAS products, no
    products of their own (mma "none"), compiled with the blocks their launcher uses."""
    from triton.runtime.jit import MockTensor

    from tspin_kernels.kernels import fused_loss as E

    logits, i64, f32 = MockTensor(torch.float32, [NC_, V_]), MockTensor(torch.int64), MockTensor(torch.float32)
    out = MockTensor(dt, [NC_, V_])
    lse = (logits, i64, f32, f32, NC_, V_, V_)
    dl = (logits, i64, f32, f32, out, f32, NC_, V_, V_, V_)
    return [
        ("fused loss: row log-sum-exp", E._row_lse_kernel, lse, E._blocks("lse")),
        ("fused loss: dlogits", E._loss_dlogits_kernel, dl, dict(E._blocks("dlogits"), HAS_COLSUM=False)),
        ("fused loss: dlogits+bias", E._loss_dlogits_kernel, dl, dict(E._blocks("dlogits"), HAS_COLSUM=True)),
    ]


def _cubin_usage(cubin: bytes) -> dict:
    """Registers and local memory (spills), and the machine code's atomics and memory barriers (SASS)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage, sass = (subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout
                       for flag in ("--dump-resource-usage", "--dump-sass"))
    found = {k: re.search(rf"\b{k}:(\d+)", usage) for k in ("REG", "LOCAL")}
    if not all(found.values()):
        raise RuntimeError(f"could not read registers and local memory from cuobjdump's output:\n{usage}")
    return {"registers": int(found["REG"].group(1)), "local_bytes": int(found["LOCAL"].group(1)),
            "atomics": sorted(set(re.findall(r"\b(?:REDG?|ATOMG?)\.E\.[\w.]+", sass))),
            "barriers": sorted(set(re.findall(r"\b(?:MEMBAR\.\w+\.(?:GPU|SYS)|CCTL\.IVALL)\b", sass)))}


def measure(arch: int, tiles: list[dict] | None = None, dtypes=None) -> list[dict]:
    """Compile every variant for ``arch`` (e.g. 90) in every dtype; one record per compiled kernel.
    ``tiles``: configs to compile instead of the built-in one (candidates for benchmarks/tile_sweep.py)."""
    from triton.runtime import driver

    from tspin_kernels import _device
    from tspin_kernels.kernels import fused_logps as K

    capability, label = ARCHS[arch]
    limit = _device.shared_memory_limit(capability)
    records = []
    try:
        previous = driver.active
    except RuntimeError:  # no GPU driver on this machine: nothing to restore
        previous = None
    driver.set_active(_CompileOnlyDriver(capability))
    try:
        for dname, dt in DTYPES.items():
            if dtypes and dname not in dtypes:
                continue
            for cfg in tiles or [K.tile_config(capability, dt, limit)]:
                records += _compile_variants(arch, label, limit, dname, dt, cfg)
    finally:
        if previous is not None:
            driver.set_active(previous)
    return records


def _compile_variants(arch, label, limit, dname, dt, cfg) -> list[dict]:
    meta = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], UPCAST=False,
                DOT_PRECISION="tf32", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    records = []
    tiles = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**cfg)
    variants = [(n, k, a, dict(c, **meta), tiles) for n, k, a, c in _variants(dt)]
    variants += [(n, k, a, c, "{BLOCK_M}x{BLOCK_V} w{num_warps}".format(**c)) for n, k, a, c in _epilogue_variants(dt)]
    for name, kernel, args, constexprs, config in variants:
        rec = dict(arch=f"sm_{arch}", gpus=label, dtype=dname, kernel=name, shared_limit=limit, config=config)
        try:
            compiled = kernel.warmup(*args, grid=(1,), **constexprs)
        except Exception as e:  # a compiler crash for this target is a finding, not the end of the report
            records.append(dict(rec, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        ptx = compiled.asm["ptx"]
        records.append(dict(
            rec, shared_bytes=int(compiled.metadata.shared),
            mma=next((k for k, op in MMA.items() if op in ptx), "none"), **_cubin_usage(compiled.asm["cubin"]),
        ))
    return records


def problems(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        where = f"{r['arch']} {r['dtype']} {r['kernel']} ({r['config']})"
        if "error" in r:
            out.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["shared_bytes"] > r["shared_limit"]:
            out.append(f"{where}: {r['shared_bytes']} B of shared memory > the {r['shared_limit']} B limit")
        if r["local_bytes"]:
            out.append(f"{where}: spills {r['local_bytes']} B to local memory")
        ordered = [a for a in r.get("atomics", ()) if not a.startswith("RED")] + list(r.get("barriers", ()))
        if ordered:  # gradient sums need atomicity only: fire-and-forget REDs, no ATOM round trips or barriers
            out.append(f"{where}: atomics other than plain reductions, or GPU-wide barriers: {ordered}")
    return out


def markdown(records: list[dict]) -> str:
    rows = ["| arch | dtype | kernel | tiles | regs | spill B | shared KiB / limit | MMA | atomics (SASS) |",
            "|" + "---|" * 9]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['arch']} | {r['dtype']} | {r['kernel']} | {r['config']} | does not compile: "
                        f"{r['error'][:60]} |||||")
            continue
        atomics = ", ".join(a.split(".FTZ")[0] for a in r["atomics"]) or "none"
        rows.append(f"| {r['arch']} | {r['dtype']} | {r['kernel']} | {r['config']} | {r['registers']} | "
                    f"{r['local_bytes']} | {r['shared_bytes'] / 1024:.0f} / {r['shared_limit'] / 1024:.0f} | "
                    f"{r['mma']} | {atomics} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=sorted(ARCHS), choices=sorted(ARCHS))
    ap.add_argument("--json", type=Path, help="also write the records here")
    ap.add_argument("--tiles", nargs="+", default=None,
                    help="compile these 'BM,BN,BK,warps,stages' configs instead of the built-in ones")
    ap.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    import triton

    from tspin_kernels import _options

    try:
        tiles = [_options.parse_tiles(t, "--tiles") for t in args.tiles] if args.tiles else None
    except ValueError as e:
        ap.error(str(e))
    records = [r for arch in args.arch for r in measure(arch, tiles, args.dtype)]
    print(f"Triton {triton.__version__}, torch {torch.__version__}")
    print(markdown(records))
    if args.json:
        from benchmarks.common import commit

        cmd = " ".join(["python -m benchmarks.kernel_resources", *(argv if argv is not None else sys.argv[1:])])
        prov = {"triton": triton.__version__, "torch": torch.__version__, "commit": commit(), "command": cmd,
                "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({**prov, "records": records}, indent=1))
        tmp.replace(args.json)
    bad = problems(records)
    for p in bad:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
