#!/usr/bin/env bash
# Install the vLLM 0.26.0 bundle built by benchmarks/gpu_vllm_wheels.sh on a bare GPU device (runs THERE).
#
# Usage: bash benchmarks/gpu_vllm_install.sh PART_DIR...
#   Appends the pieces in each PART_DIR (.whl-vllm/partK, carried by the device tool) to /tmp/vllm-bundle/. Once
#   all pieces are there (the count is in every part) it reassembles bundle.tar.xz, checks the sha256 recorded when
#   the bundle was built, unpacks the wheels and installs them with
#   `pip install --no-index --no-deps --no-compile --target /tmp/site-vllm`, then runs the import check
#   (benchmarks/gpu_vllm_imports.py: vllm, LLM, the V1 engine / GPU worker / FlashAttention / sleep-mode / LoRA
#   modules, tspin's vllm_* modules). Before that it prints which parts are still missing and exits 0.
#   Idempotent: once installed, later calls only print the PYTHONPATH line (exit 0).
#
# Device session (the device tool copies the working tree + `carry`, 64 MiB per call; N parts from
# gpu_vllm_wheels.sh, 2 in the default hopper mode; the machine is given back after ~30 s idle and /tmp with it,
# so make the calls back to back; if the reply says a part is missing, start again from part1):
#   call 1: run(carry=[".whl-vllm/part1"], command="bash benchmarks/gpu_vllm_install.sh .whl-vllm/part1",
#               timeout_s=300)
#   call N: run(carry=[".whl-vllm/partN"], timeout_s=600, command="bash benchmarks/gpu_vllm_install.sh
#               .whl-vllm/partN && PYTHONPATH=/tmp/site-vllm:$PWD /opt/torch/.venv/bin/python3 <GPU check>")
# Later calls on the same warm machine: prefix the command with `export PYTHONPATH=/tmp/site-vllm:$PWD;`.
#
# Env: PYTHON (default /opt/torch/.venv/bin/python3 where it exists, else python3), VLLM_BUNDLE_DIR
# (/tmp/vllm-bundle), VLLM_SITE (/tmp/site-vllm), VLLM_INSTALL_CHECK=full|quick|none (full).
set -euo pipefail
cd "$(dirname "$0")/.."

B=${VLLM_BUNDLE_DIR:-/tmp/vllm-bundle}
T=${VLLM_SITE:-/tmp/site-vllm}
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x /opt/torch/.venv/bin/python3 ]] && PYTHON=/opt/torch/.venv/bin/python3
fi
mkdir -p "$B"

for d in "$@"; do
    [[ -f "$d/bundle.sha256" ]] || { echo "$d: no bundle.sha256 (not a part from gpu_vllm_wheels.sh?)" >&2; exit 2; }
    if [[ -f "$B/bundle.sha256" ]] && ! cmp -s "$d/bundle.sha256" "$B/bundle.sha256"; then
        echo "$d belongs to another bundle than the parts in $B: starting over with it" >&2
        rm -rf "${B:?}"/*
    fi
    cp -f "$d"/bundle.tar.xz.?? "$d/bundle.sha256" "$d/bundle.parts" "$B/"
    echo "copied $(cd "$d" && ls bundle.tar.xz.?? | tr '\n' ' ')from $d to $B"
done

finish() {
    export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
    echo "vLLM: export PYTHONPATH=$T:$PWD  (python: $PYTHON)"
    case "${VLLM_INSTALL_CHECK:-full}" in
        none) ;;
        quick) PYTHONPATH="$T:$PWD" "$PYTHON" -c "import vllm; from vllm import LLM; print('vllm', vllm.__version__)" ;;
        *) PYTHONPATH="$T:$PWD" "$PYTHON" benchmarks/gpu_vllm_imports.py ;;
    esac
}

if [[ -f "$T/.installed" ]] && cmp -s "$T/.installed" "$B/bundle.sha256"; then
    echo "vLLM bundle already installed in $T"
    [[ $# -gt 0 ]] && finish
    exit 0
fi

[[ -f "$B/bundle.parts" ]] || { echo "no part in $B yet: carry .whl-vllm/part1 and pass it" >&2; exit 2; }
n=$(cat "$B/bundle.parts")
missing=()
for ((k = 0; k < n; k++)); do
    [[ -f "$B/bundle.tar.xz.$(printf %02d "$k")" ]] || missing+=("part$((k + 1))")
done
if ((${#missing[@]})); then
    echo "have $((n - ${#missing[@]})) of $n parts in $B; still to carry: ${missing[*]} (next call, back to back)"
    exit 0
fi

echo "all $n parts here: reassembling, checking, installing into $T"
cat "$B"/bundle.tar.xz.?? > "$B/bundle.tar.xz"
(cd "$B" && sha256sum -c bundle.sha256)
rm -rf "$B/wheels" "$T"
"$PYTHON" - "$B/bundle.tar.xz" "$B" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1], "r|xz") as tar:
    tar.extractall(sys.argv[2], filter="data")
EOF
"$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$T" "$B"/wheels/*.whl
cp "$B/bundle.sha256" "$T/.installed"
rm -rf "$B/wheels" "$B/bundle.tar.xz" "$B"/bundle.tar.xz.??  # keep /tmp small; $T/.installed records what is there
echo "installed $(ls "$B" >/dev/null; ls -d "$T"/*.dist-info | wc -l) distributions into $T ($(du -sh "$T" | cut -f1))"
finish
