#!/usr/bin/env bash
# The GPU benchmark suite (or one part of it), on the GPU machine, with the CUDA torch already there.
#   bash benchmarks/gpu_suite.sh [PART]   (`make bench-gpu PART=...`)
# PART: all | checks | tile-sweep | profile | loop | kernels-mistral | kernels-llama3 | kernels-qwen | loss-paths | e2e-llama |
#       e2e-mistral-tspin | e2e-mistral-naive | layouts (a T-SPIN step with padded / packed / shared-prefix batches,
#       sdpa and flex), or any pytest -k expression. `loss-paths`: forward+backward with a trainable head at the
#       three shapes for every peer (the library's plain call `default`, the fused loss path `triton_fused`, the
#       recompute ones). `checks` is not a benchmark: the GPU correctness tests
#       (`pytest tests -m gpu`: kernels vs float64 on CUDA, int64 addressing, one-GPU FSDP2) and the Mistral-7B LoRA
#       memory check (scripts/gpu_fsdp_lora_check.py), whose JSON lands in benchmarks/results/ too.
#       `tile-sweep` times the forward and backward kernels under a grid of tile configs at llama3-8b
#       (benchmarks/tile_sweep.py; TILE_SWEEP_ARGS="--shape mistral-7b ..." for others).
#       `profile`: torch.profiler's per-kernel table of one forward+backward at llama3-8b
#       (benchmarks/profile_fused.py) for the fused loss path, the plain call and torch.compile of the naive loss with
#       a trainable head, then the fused path with a frozen head: kernels, GEMM shapes and TFLOP/s, categories, host
#       syncs, the chunk plan, against the bf16 matmul peak. Two JSON files, each with its .md, in
#       benchmarks/results/<device>-profile-llama3-8b[-frozen]-<yyyymmdd>.*; about 3-4 minutes on an H200
#       (torch.compile's first compile is about one of them). Each run is capped (PROFILE_LIMIT_S, default 330 s;
#       PROFILE_FROZEN_LIMIT_S, 150 s) so that its files reach $OUT within the device tool's 10 minutes; it writes
#       after every path, so a capped run keeps the paths it finished. A third run profiles the fused path with a
#       cap of 2**29 logits (TSPIN_CHUNK_ELEMENTS; PROFILE_CAP_LIMIT_S, 90 s): one pass over llama3-8b's triplets
#       instead of two. PROFILE_ARGS="--trace DIR ..." adds to all three.
#       `loop`: the whole self-play loop on this GPU (scripts/gpu_loop.py; LOOP_ARGS="--parts ..." for some parts):
#       tspin iterate at the Llama-1B shape sampling with HF generate and with vLLM, shared-prefix batches, LoRA,
#       single-GPU FSDP2 and the HF Trainer backend, each checked and timed per phase; `make gpu-smoke`. vLLM is not
#       on the GPU image: benchmarks/gpu_vllm_wheels.sh says how it travels.
# TSPIN_BENCH_ROUNDS=N lowers the timed rounds per kernel case (default 10).
# Results go to benchmarks/results/<device>-<yyyymmdd>.json (parts accumulate in one file), plots next to it.
# Each part's session replaces that file whole when it ends, so a part has written its results before the next
# one starts, and a run cut short (a time limit, a lost machine) keeps every part that finished. When $OUT is set
# (the device tool), the results JSON written so far and the log are copied there after every part.
# CCE and Liger wheels found in .whl/ (benchmarks/gpu_wheels.sh) are installed first; without them those peers are
# skipped with the reason. Set TSPIN_COMMIT=<sha> where the tree travels without .git. Each part fits in the device
# tool's 10 minutes; `all` does not: run it where no such limit applies, or part by part.
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-all}"
PY="${PYTHON:-python3}"
ALL_PARTS="kernels-qwen kernels-mistral kernels-llama3 e2e-llama e2e-mistral-tspin e2e-mistral-naive layouts"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# vLLM, where benchmarks/gpu_vllm_install.sh put it on this machine (the `loop` part samples with it; without it
# that part's vLLM run is skipped, with the reason). Its worker processes import tspin: the repository goes on too.
if [ -f /tmp/site-vllm/.installed ]; then
  export PYTHONPATH="/tmp/site-vllm:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1  # no network there: nothing may try it
LOG="/tmp/gpu-$(printf %s "$PART" | tr -c 'A-Za-z0-9_.-' '_').log"
STARTED="$(mktemp)"  # results files changed since this run began are the ones copied to $OUT
trap 'rm -f "$STARTED"' EXIT
mkdir -p benchmarks/results
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$LOG"

save() {  # the results written so far and the log, to $OUT (the tool brings back a few files: JSON, .md and log only)
  [ -n "${OUT:-}" ] || return 0
  find benchmarks/results -maxdepth 1 \( -name '*.json' -o -name '*.md' \) -newer "$STARTED" -exec cp {} "$OUT"/ \;
  cp "$LOG" "$OUT"/
}

if [ "$PART" = checks ]; then
  "$PY" -m pytest -q tests -m gpu -p no:cacheprovider -rs 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  save
  "$PY" scripts/gpu_fsdp_lora_check.py --only lora7b 2>&1 | tee -a "$LOG"
  rc2=${PIPESTATUS[0]}
  save
  [ "$rc" -eq 0 ] && exit "$rc2"
  exit "$rc"
fi
if [ "$PART" = tile-sweep ]; then
  "$PY" -m benchmarks.tile_sweep ${TILE_SWEEP_ARGS:-} 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  save
  exit "$rc"
fi

if [ "$PART" = loop ]; then  # scripts/gpu_loop.py copies its JSON, plot and log to $OUT after every part itself
  "$PY" scripts/gpu_loop.py ${LOOP_ARGS:-} 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  save
  exit "$rc"
fi

if [ "$PART" = profile ]; then  # each run writes its JSON after every path: a capped run keeps the paths it finished
  timeout -k 10 "${PROFILE_LIMIT_S:-330}" "$PY" -m benchmarks.profile_fused --shape llama3-8b \
    --paths fused,default,compile ${PROFILE_ARGS:-} 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  save
  timeout -k 10 "${PROFILE_FROZEN_LIMIT_S:-150}" "$PY" -m benchmarks.profile_fused --shape llama3-8b --paths fused \
    --frozen ${PROFILE_ARGS:-} 2>&1 | tee -a "$LOG"
  rc2=${PIPESTATUS[0]}
  save
  # the fused path with a cap of 2**29 logits: one pass over llama3-8b's triplets (3072 rows x 128256 = 394M
  # logits, over the default 2**28, take two passes: 4 units of work instead of 3)
  TSPIN_CHUNK_ELEMENTS=536870912 timeout -k 10 "${PROFILE_CAP_LIMIT_S:-90}" "$PY" -m benchmarks.profile_fused \
    --shape llama3-8b --paths fused --out "benchmarks/results/profile-llama3-8b-fused-cap2e29-$(date -u +%Y%m%d).json" \
    ${PROFILE_ARGS:-} 2>&1 | tee -a "$LOG"
  rc3=${PIPESTATUS[0]}
  save
  [ "$rc" -eq 0 ] && [ "$rc2" -eq 0 ] && exit "$rc3"
  [ "$rc" -eq 0 ] && exit "$rc2"
  exit "$rc"
fi

selection() {  # the pytest -k expression of a part
  case "$1" in
    kernels-mistral) echo "matmul_peak_gpu or (kernel_gpu and mistral)" ;;
    kernels-llama3) echo "matmul_peak_gpu or (kernel_gpu and llama3)" ;;
    kernels-qwen) echo "matmul_peak_gpu or (kernel_gpu and qwen)" ;;
    loss-paths) echo "matmul_peak_gpu or (kernel_gpu and fwd_bwd and trainable)" ;;  # every path, 3 shapes
    e2e-llama) echo "e2e_gpu_throughput or (e2e_gpu_max_batch and llama)" ;;
    e2e-mistral-tspin) echo "e2e_gpu_max_batch and mistral and tspin" ;;
    e2e-mistral-naive) echo "e2e_gpu_max_batch and mistral and naive_hf" ;;
    layouts) echo "layout_step_gpu" ;;
    *) echo "$1" ;;
  esac
}

run_part() {  # one pytest session; when it returns, its results are in the results file (and in $OUT)
  echo "[gpu_suite] part $1: -k \"$(selection "$1")\"" | tee -a "$LOG"
  TSPIN_BENCH=1 "$PY" -m pytest -q benchmarks -m gpu -k "$(selection "$1")" -p no:cacheprovider \
    --benchmark-columns=median,rounds ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "[gpu_suite] part $1 done (exit $rc); its results are written" | tee -a "$LOG"
  save
  return "$rc"
}

if [ "$PART" = all ]; then
  rc=0
  for part in $ALL_PARTS; do
    run_part "$part" || rc=1
  done
else
  run_part "$PART"
  rc=$?
fi
"$PY" benchmarks/plot.py --markdown | tee -a "$LOG"
save
exit "$rc"
