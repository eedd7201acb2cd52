#!/usr/bin/env bash
# The GPU benchmark suite (or one part of it), on the GPU machine, with the CUDA torch already there.
#   bash benchmarks/gpu_suite.sh [PART]   (`make bench-gpu PART=...`)
# PART: all | checks | tile-sweep | kernels-mistral | kernels-llama3 | kernels-qwen | loss-paths | e2e-llama |
#       e2e-mistral-tspin | e2e-mistral-naive | layouts (a T-SPIN step with padded / packed / shared-prefix batches,
#       sdpa and flex), or any pytest -k expression. `loss-paths`: forward+backward with a trainable head at the
#       three shapes for every peer (the fused loss path `triton_fused` vs the recompute ones). `checks` is not a
#       benchmark: the GPU correctness tests
#       (`pytest tests -m gpu`: kernels vs float64 on CUDA, int64 addressing, one-GPU FSDP2) and the Mistral-7B LoRA
#       memory check (scripts/gpu_fsdp_lora_check.py), whose JSON lands in benchmarks/results/ too.
#       `tile-sweep` times the forward and backward kernels under a grid of tile configs at llama3-8b
#       (benchmarks/tile_sweep.py; TILE_SWEEP_ARGS="--shape mistral-7b ..." for others).
# TSPIN_BENCH_ROUNDS=N lowers the timed rounds per kernel case (default 10).
# Results go to benchmarks/results/<device>-<yyyymmdd>.json (parts accumulate in one file), plots next to it;
# when $OUT is set (the device tool), the results JSON and the log are copied there. CCE and Liger wheels found
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
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
LOG="/tmp/gpu-$(printf %s "$PART" | tr -c 'A-Za-z0-9_.-' '_').log"
mkdir -p benchmarks/results
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$LOG"
if [ "$PART" = checks ]; then
  "$PY" -m pytest -q tests -m gpu -p no:cacheprovider -rs 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  "$PY" scripts/gpu_fsdp_lora_check.py --only lora7b 2>&1 | tee -a "$LOG"
  rc2=${PIPESTATUS[0]}
  [ -n "${OUT:-}" ] && cp benchmarks/results/fsdp-lora-*.json "$LOG" "$OUT"/ 2>/dev/null
  [ "$rc" -eq 0 ] && exit "$rc2"
  exit "$rc"
fi
if [ "$PART" = tile-sweep ]; then
  "$PY" -m benchmarks.tile_sweep ${TILE_SWEEP_ARGS:-} 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ -n "${OUT:-}" ] && cp benchmarks/results/tile-sweep-*.json "$LOG" "$OUT"/ 2>/dev/null
  exit "$rc"
fi
case "$PART" in
  all) SEL="gpu" ;;
  kernels-mistral) SEL="matmul_peak_gpu or (kernel_gpu and mistral)" ;;
  kernels-llama3) SEL="matmul_peak_gpu or (kernel_gpu and llama3)" ;;
  kernels-qwen) SEL="matmul_peak_gpu or (kernel_gpu and qwen)" ;;
  loss-paths) SEL="matmul_peak_gpu or (kernel_gpu and fwd_bwd and trainable)" ;;  # fused vs recompute, 3 shapes
  e2e-llama) SEL="e2e_gpu_throughput or (e2e_gpu_max_batch and llama)" ;;
  e2e-mistral-tspin) SEL="e2e_gpu_max_batch and mistral and tspin" ;;
  e2e-mistral-naive) SEL="e2e_gpu_max_batch and mistral and naive_hf" ;;
  layouts) SEL="layout_step_gpu" ;;
  *) SEL="$PART" ;;
esac
export TSPIN_BENCH=1
"$PY" -m pytest -q benchmarks -m gpu -k "$SEL" -p no:cacheprovider --benchmark-columns=median,rounds \
  ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
"$PY" benchmarks/plot.py --markdown | tee -a "$LOG"
if [ -n "${OUT:-}" ]; then  # the tool brings back at most 8 files: JSON and log only (`make plots` redraws here)
  cp benchmarks/results/*.json "$LOG" "$OUT"/ 2>/dev/null
fi
exit "$rc"
