#!/usr/bin/env bash
# Download the optional benchmark peers as wheels into .whl/ (gitignored), to carry them to the GPU machine,
# which has no internet. Both are pure-Python (Triton) packages; --no-deps because torch and triton are there.
# Also `datasets` (tspin loads its data files through it; the GPU image lacks it) with dill and multiprocess, its
# two requirements the image lacks (pyarrow, fsspec, xxhash, pandas, huggingface-hub are there): the `loop` part
# of benchmarks/gpu_suite.sh runs `tspin iterate`.
#   bash benchmarks/gpu_wheels.sh            # pinned versions below
#   CCE_VERSION=25.1.1 LIGER_VERSION=0.8.5 bash benchmarks/gpu_wheels.sh
# On the GPU machine benchmarks/gpu_suite.sh installs them with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
CCE_VERSION="${CCE_VERSION:-25.1.1}"
LIGER_VERSION="${LIGER_VERSION:-0.8.5}"
DATASETS_VERSION="${DATASETS_VERSION:-5.2.0}"  # its pins: dill < 0.4.2, multiprocess < 0.70.20
PY="${PYTHON:-python3}"
mkdir -p .whl
git check-ignore -q .whl/x.whl || { echo "add /.whl/ to .gitignore first: wheels must not be committed" >&2; exit 1; }
rm -f .whl/cut_cross_entropy-*.whl .whl/liger_kernel-*.whl .whl/datasets-*.whl .whl/dill-*.whl \
  .whl/multiprocess-*.whl  # one version of each: two stop the install
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  "cut-cross-entropy==${CCE_VERSION}" "liger-kernel==${LIGER_VERSION}" "datasets==${DATASETS_VERSION}" \
  "dill==0.4.1" "multiprocess==0.70.19"
ls -l .whl
