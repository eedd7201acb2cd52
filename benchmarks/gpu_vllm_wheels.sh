#!/usr/bin/env bash
# Build the vLLM 0.26.0 bundle for a GPU device session (runs HERE, on the CPU machine, before the session).
#
# Why: the device image (Python 3.12, torch 2.11.0+cu130, transformers 5.17, numpy 2.5, ...) has no vLLM and no
# internet; the device tool copies the working tree plus at most 8 `carry` paths, 64 MiB per call in all (the
# tracked repo takes ~5 MiB). vllm 0.26.0 (the release that pins torch==2.11.0, CUDA 13) is a 290 MiB wheel, so the
# bundle travels in parts of at most PART_MIB (55) MiB, one part per call, reassembled on the device by
# benchmarks/gpu_vllm_install.sh while the machine stays warm (it is given back after ~30 s idle: make the calls
# back to back).
#
# What: `pip download --require-hashes --no-deps --only-binary=:all:` of benchmarks/gpu_vllm_requirements.txt
# (vllm 0.26.0 + the 19 packages it needs for tspin's use that the image lacks; cp312 / abi3 / pure-python
# manylinux x86_64 wheels) into .whl-vllm/wheels/, then every wheel is re-packed uncompressed (ZIP_STORED), all of
# them go into one tar, xz -9 (the CUDA kernels compress 2-5x better with xz than with a wheel's deflate), split
# into .whl-vllm/part1, part2, ... each with the pieces it holds, the bundle's sha256 and the piece count.
#
# Modes:
#   (default) hopper: the vllm wheel without what an H100 / H200 (SM 9.0) never loads for a dense bf16 model:
#             vllm_flash_attn/_vllm_fa2_C.abi3.so (FlashAttention 2: other GPUs, ALiBi, TurboQuant KV; Hopper
#             uses FA3), _moe_C_stable_libtorch.abi3.so (mixture-of-experts kernels only; vLLM imports it inside
#             contextlib.suppress(ImportError)), vllm-rs (the Rust frontend binary, VLLM_RUST_FRONTEND only),
#             third_party/deep_gemm and third_party/fmha_sm100 (FP8 GEMM / Blackwell / MiniMax kernels).
#             77 MiB (80.8 MB): 2 parts (55 + 22 MiB), 2 calls.
#   --full    the vllm wheel as published (other GPUs, MoE models): 204 MiB, 4 parts, 4 calls. (The wheels as
#             published, deflate only, are 300 MiB: 6 parts.)
#
# Device session (one H100/H200, 15 min): N = the number of parts this script printed. Make the calls back to back:
#   call 1:   run(carry=[".whl-vllm/part1"], command="bash benchmarks/gpu_vllm_install.sh .whl-vllm/part1")
#   ...
#   call N:   run(carry=[".whl-vllm/partN"],
#                 command="bash benchmarks/gpu_vllm_install.sh .whl-vllm/partN && <the GPU check itself>")
# The last call reassembles, checks the sha256, installs into /tmp/site-vllm and runs the import check; the check
# itself then runs with `PYTHONPATH=/tmp/site-vllm:$PWD` (see gpu_vllm_install.sh, which prints the line to use).
# Each call moves ~60 MiB (part + tree); budget ~20-40 s per call on a warm machine plus the first start.
#
# Usage: bash benchmarks/gpu_vllm_wheels.sh [--full]     (env: PART_MIB=55, PYTHON=python3 with pip, XZ_LEVEL=9)
# .whl-vllm/ is ignored by git: run this on the session's own machine before the first device call (2 cores:
# ~3 min hopper, ~7 min --full, mostly xz; ~300 MB downloaded from PyPI, hash-checked).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=hopper
[[ "${1:-}" == "--full" ]] && MODE=full
PART_MIB=${PART_MIB:-55}
PY=${PYTHON:-python3}
OUT=${VLLM_WHEELS_OUT:-.whl-vllm}  # another folder only for tests: the device calls carry .whl-vllm/partK
REQ=benchmarks/gpu_vllm_requirements.txt

rm -rf "$OUT/part"* "$OUT/stage" "$OUT/bundle.tar.xz" "$OUT/wheels"
mkdir -p "$OUT/wheels" "$OUT/stage/wheels"

# 1. the wheels (pip's cache keeps a second run from downloading them again)
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --require-hashes \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$OUT/wheels" -r "$REQ" 2>&1 | grep -v "^WARNING: Location" || true
want=$(grep -c '==' "$REQ")
have=$(ls "$OUT"/wheels/*.whl | wc -l)
[[ "$have" -eq "$want" ]] || { echo "expected $want wheels in $OUT/wheels, found $have" >&2; exit 1; }

# 2. re-pack uncompressed (and slim the vllm wheel in hopper mode); deterministic: members keep their dates
"$PY" - "$MODE" "$OUT/wheels" "$OUT/stage/wheels" <<'EOF'
import sys, zipfile
from pathlib import Path

mode, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
DROP = ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/_moe_C_stable_libtorch.abi3.so", "vllm/vllm-rs",
        "vllm/third_party/deep_gemm/", "vllm/third_party/fmha_sm100/")
dropped = 0
for whl in sorted(src.glob("*.whl")):
    slim = mode == "hopper" and whl.name.startswith("vllm-")
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(dst / whl.name, "w", zipfile.ZIP_STORED) as zout:
        gone = set()
        for info in zin.infolist():
            if slim and info.filename.startswith(DROP):
                gone.add(info.filename)
                dropped += info.file_size
                continue
            data = zin.read(info)
            if slim and info.filename.endswith(".dist-info/RECORD"):
                continue  # written last, without the dropped files
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
        if slim:
            rec = next(i for i in zin.infolist() if i.filename.endswith(".dist-info/RECORD"))
            lines = [l for l in zin.read(rec).decode().splitlines() if l.split(",", 1)[0] not in gone]
            rec.compress_type = zipfile.ZIP_STORED
            zout.writestr(rec, "\n".join(lines) + "\n")
print(f"re-packed {len(list(dst.glob('*.whl')))} wheels ({mode}); left out of vllm: {dropped / 2**20:.0f} MiB")
EOF

# 3. one tar, xz, split into parts of PART_MIB MiB
tar -C "$OUT/stage" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - wheels \
    | xz -"${XZ_LEVEL:-9}" -T2 -c > "$OUT/bundle.tar.xz"
sum=$(sha256sum "$OUT/bundle.tar.xz" | cut -d' ' -f1)
split -b "${PART_MIB}M" -d -a 2 "$OUT/bundle.tar.xz" "$OUT/stage/bundle.tar.xz."
pieces=("$OUT"/stage/bundle.tar.xz.??)
n=${#pieces[@]}
for i in "${!pieces[@]}"; do
    d="$OUT/part$((i + 1))"
    mkdir -p "$d"
    mv "${pieces[$i]}" "$d/"
    echo "$sum  bundle.tar.xz" > "$d/bundle.sha256"
    echo "$n" > "$d/bundle.parts"
    echo "$MODE" > "$d/bundle.mode"
done
rm -rf "$OUT/stage"
total=$(stat -c %s "$OUT/bundle.tar.xz")
echo "bundle ($MODE): $OUT/bundle.tar.xz $((total / 1048576)) MiB ($total bytes), sha256 $sum"
for d in "$OUT"/part*; do echo "  $d: $(du -b "$d" | cut -f1) bytes"; done
echo "device session: $n calls, call K carrying [\"$OUT/partK\"] and running" \
     "'bash benchmarks/gpu_vllm_install.sh $OUT/partK' (K = 1..$n, back to back)"
