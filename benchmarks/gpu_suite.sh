#!/usr/bin/env bash
# The GPU benchmark suite (or one part of it), on the GPU machine, with the CUDA torch already there.
#   bash benchmarks/gpu_suite.sh [all|kernels-1|kernels-2|e2e-llama|e2e-mistral]   (`make bench-gpu PART=...`)
# Results go to benchmarks/results/<device>-<yyyymmdd>.json (parts accumulate in one file), plots next to it;
# when $OUT is set (the device tool), results, plots and the log are copied there. CCE and Liger wheels found
# in .whl/ (benchmarks/gpu_wheels.sh) are installed first; without them those peers are skipped with the reason.
# Set TSPIN_COMMIT=<sha> where the tree travels without .git. Each part fits in the device tool's 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-all}"
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
case "$PART" in
  all) SEL="gpu" ;;
  kernels-1) SEL="matmul_peak_gpu or (kernel_gpu and (mistral or qwen))" ;;
  kernels-2) SEL="kernel_gpu and llama3" ;;
  e2e-llama) SEL="e2e_gpu_throughput or (e2e_gpu_max_batch and llama)" ;;
  e2e-mistral) SEL="e2e_gpu_max_batch and mistral" ;;
  *) echo "unknown part $PART (all|kernels-1|kernels-2|e2e-llama|e2e-mistral)" >&2; exit 2 ;;
esac
export TSPIN_BENCH=1 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
LOG="benchmarks/results/gpu-${PART}.log"
mkdir -p benchmarks/results
"$PY" -m pytest -q benchmarks -m gpu -k "$SEL" -p no:cacheprovider --benchmark-columns=median,rounds \
  ${BENCH_ARGS:-} 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
"$PY" benchmarks/plot.py --markdown | tee -a "$LOG"
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/*.json "$LOG" "$OUT"/ 2>/dev/null
  mkdir -p "$OUT/png" && cp benchmarks/results/*.png "$OUT/png/" 2>/dev/null
fi
exit "$rc"
